"""The gRPC servicer of one tensor-parallel rank: the router's `TextGenerationService` over a `ModelRunner`.

The router sends every RPC to every rank, and the ranks run the same steps in lockstep (the collectives
inside the model pair up). So that the steps on all ranks happen in the same order, every RPC that
touches the runner runs on one dedicated thread, one at a time, in arrival order. The event loop stays
free, so `Health` answers during a long step.

`LoadAdapter` puts only the copy into the adapter pool on the step thread. Reading the files,
validating, converting and sharding run first in the rank's adapter reader (`worker/lora/reader.py`: a
child process at idle priority), so steps keep running while an adapter loads: they change no state the
steps read, and their time would otherwise stall every running request. The copy itself must be on the
step thread: the steps read the pool, and a copy between two steps can never be seen half done.
The prepared adapter is kept in the host tier (`worker/lora/host_cache.py`), so loading it again (after
an eviction, or a retry once the router made room in the pool) skips the file.

Errors are mapped at the edge by `_rpc`:
- no room in the adapter pool (`AdapterMemoryError`) -> RESOURCE_EXHAUSTED: nothing changed, the router
  makes room and loads again;
- a bad request (`RequestError`, which validation of the proto fields also raises, or `AdapterError`)
  -> INVALID_ARGUMENT with the message, which names the request or the adapter. These are raised before
  the runner changes any state, identically on every rank, so the ranks stay in lockstep (the slot and
  generation checks too, as long as the router names a load in a row only once every rank acked it);
- anything else -> INTERNAL ("rank <r>: <type>: <message>"), logged with the request ids involved. The
  failed step may have left the ranks out of lockstep, so the rank marks itself unhealthy for good:
  `Health`, `Prefill` and `Decode` then answer UNAVAILABLE until the worker is restarted. Except in the
  adapter reader, which changes nothing the steps read: that load alone fails (INTERNAL, "rank <r>:
  adapter '<id>': <type>: <message>").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import grpc

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pb_grpc
from worker.auth import TokenInterceptor
from worker.lora.adapter import AdapterError
from worker.lora.host_cache import HostAdapterCache, cache_key
from worker.lora.reader import AdapterReader, ReaderProcess
from worker.lora.slots import AdapterMemoryError
from worker.runner import ModelRunner, PrefillRequest, RequestError, TokenOutput
from worker.sampler import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")
# SamplingParameters fields whose proto3 default (0) is invalid: 0 means "unset", i.e. the neutral value.
_ZERO_MEANS_NEUTRAL = ("temperature", "top_p", "typical_p", "repetition_penalty")


class Unhealthy(Exception):
    """A step was refused because an earlier one failed on this rank."""


def _rpc(handler: Callable[[WorkerServicer, T, grpc.aio.ServicerContext], Awaitable]):
    """Map a handler's exceptions to gRPC status codes (see the module docstring)."""

    @functools.wraps(handler)
    async def wrapped(self: WorkerServicer, request: T, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except AdapterMemoryError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except (RequestError, AdapterError) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Unhealthy as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except Exception as err:
            message = f"rank {self.rank}: {type(err).__name__}: {err}"
            log.error("%s failed (%s): %s", handler.__name__, _involved(request), message, exc_info=err)
            self._mark_failed(err)
            await context.abort(grpc.StatusCode.INTERNAL, message)

    return wrapped


def step_thread(rank: int) -> ThreadPoolExecutor:
    """The one thread that runs a rank's torch work. Build the runner on it too: each thread that runs
    torch ops gets its own OpenMP team, and the idle team of a second thread spins on the cores the
    steps need."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-step")


class WorkerServicer(pb_grpc.TextGenerationServiceServicer):
    def __init__(
        self,
        runner: ModelRunner,
        steps: ThreadPoolExecutor | None = None,
        reader: ReaderProcess | None = None,
    ):
        self.runner = runner
        self.rank = runner.ctx.rank
        self.failure: str | None = None  # why this rank is unhealthy; None while healthy
        self._steps = steps or step_thread(self.rank)
        self._reader = AdapterReader(self.rank, reader)
        # Exclusive tiers: an adapter is in the pool or in the host tier, so the CPU holds it once.
        self.host_cache = HostAdapterCache(runner.config.adapter_host_memory_bytes)
        self._keys: dict[int, tuple] = {}  # slot -> the host tier key of its adapter

    async def close(self) -> None:
        """Finish the step and the adapter read in progress, drop the queued ones, stop their threads."""
        await self._reader.close()
        await asyncio.to_thread(self._steps.shutdown, wait=True, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the step thread, after every call that arrived before it."""
        return await asyncio.get_running_loop().run_in_executor(self._steps, self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., T], *args) -> T:
        try:
            return fn(*args)
        except (RequestError, AdapterError, Unhealthy):
            raise
        except Exception as err:
            # Marked here, on the step thread, so that the step queued next already sees it.
            self._mark_failed(err)
            raise

    def _mark_failed(self, err: Exception) -> None:
        if self.failure is None:
            self.failure = f"{type(err).__name__}: {err}"
            log.error("rank %d marked unhealthy: the ranks may be out of lockstep; restart it", self.rank)

    # ---- RPCs -----------------------------------------------------------------------------------

    @_rpc
    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        """Model and capacity facts; static once the runner is built."""
        runner, hf = self.runner, self.runner.hf_config
        return pb.InfoResponse(
            model_type=hf.model_type,
            architecture=(hf.architectures or [""])[0],
            dtype=runner.config.dtype,
            device_type=runner.device.type,
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            block_size=runner.kv.block_size,
            num_blocks=runner.kv.num_blocks,
            num_adapter_slots=runner.config.max_adapters,
            max_lora_rank=runner.config.max_lora_rank,
            adapter_memory=self._memory(),
            world_size=runner.ctx.world_size,
            rank=self.rank,
        )

    @_rpc
    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        """OK unless a step failed on this rank; answered on the event loop, never queued behind steps."""
        if self.failure is not None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"rank {self.rank} is unhealthy since a step failed: {self.failure}",
            )
        return pb.HealthResponse()

    @_rpc
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.LoadAdapterResponse:
        """Read, validate, convert and shard the PEFT adapter at `path` in the adapter reader while steps
        go on, then copy it into the empty `slot` as load `generation` (queued like a step)."""
        if not request.adapter_id or not request.path:
            raise RequestError(f"LoadAdapter needs an adapter_id and a path, got {request.adapter_id!r}")
        self.runner.slots.check_load(request.slot, request.generation, request.adapter_id)
        log.info("Loading adapter weights into model: %s", request.adapter_id)
        start = time.perf_counter_ns()
        key = cache_key(request.adapter_id, Path(request.path))
        prepared = self.host_cache.pop(key)
        tier = "host" if prepared is not None else "disk"
        try:
            if prepared is None:
                spec = self.runner.read_spec()
                prepared = await self._reader.read(request.adapter_id, Path(request.path), spec)
        except (RequestError, AdapterError):
            raise
        except Exception as err:
            # The reader changes nothing the steps read: this load fails, the rank stays healthy.
            message = f"rank {self.rank}: adapter {request.adapter_id!r}: {type(err).__name__}: {err}"
            log.error("LoadAdapter failed (%s): %s", _involved(request), message, exc_info=err)
            await context.abort(grpc.StatusCode.INTERNAL, message)
        try:
            resident = await self._run(self.runner.place_adapter, request.slot, request.generation, prepared)
        except RequestError as err:
            # No room (the router makes room, then loads again: a copy then), or a refused slot: either
            # way the prepared weights are good, so they go to the host tier, not away.
            kept, dropped = self.host_cache.put(key, prepared)
            log.info("%s; kept in the host tier: %s, dropped from it: %s", err, kept, dropped)
            raise
        self._keys[request.slot] = key
        load_ns = time.perf_counter_ns() - start
        log.info(
            "adapter %r in slot %d as generation %d (r=%d, %.1f MB, from %s, %.1f ms)",
            resident.name,
            request.slot,
            resident.generation,
            resident.lora_rank,
            resident.weight_bytes / 1e6,
            tier,
            load_ns / 1e6,
        )
        return pb.LoadAdapterResponse(
            lora_rank=resident.lora_rank,
            alpha=resident.alpha,
            use_rslora=resident.use_rslora,
            target_modules=list(resident.target_modules),
            load_ns=load_ns,
            weight_bytes=resident.weight_bytes,
            tier=tier,
            memory=self._memory(),
        )

    @_rpc
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        """Empty `slot` if it holds load `generation` and no running sequence uses it (queued like a
        step); its pool rows are NaN-filled and freed, so nothing can read the weights any more. With
        `keep` (an eviction) its weights go to the host tier."""
        keep = request.keep and self.host_cache.budget_bytes > 0
        held, kept = await self._run(self.runner.unload_adapter, request.slot, request.generation, keep)
        key = self._keys.pop(request.slot, None)
        in_host, dropped = False, []
        if kept is not None and key is not None:
            in_host, dropped = self.host_cache.put(key, kept)  # the host tier holds what left the pool
        log.info("adapter %r unloaded from slot %d (generation %d)", held.name, request.slot, held.generation)
        return pb.UnloadAdapterResponse(memory=self._memory(), host_kept=in_host, host_dropped=dropped)

    @_rpc
    async def DropHostCopy(self, request: pb.DropHostCopyRequest, context) -> pb.DropHostCopyResponse:
        """Free the host tier's copy of `adapter_id` (its name was unloaded while out of the pool)."""
        dropped = self.host_cache.drop(request.adapter_id)
        log.info("adapter %r dropped from the host tier: %s", request.adapter_id, dropped)
        return pb.DropHostCopyResponse(memory=self._memory(), dropped=dropped)

    def _memory(self) -> pb.AdapterMemory:
        """The tiers' bytes on this rank, now."""
        pool = self.runner.slots.pool
        return pb.AdapterMemory(
            pool_bytes_used=pool.bytes_used if pool is not None else 0,
            pool_bytes_total=pool.bytes_total if pool is not None else 0,
            host_bytes_used=self.host_cache.bytes_used,
            host_bytes_total=self.host_cache.budget_bytes,
        )

    @_rpc
    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.StepResponse:
        """Run the prompts of new sequences and sample each one's first token."""
        return await self._run(self._prefill, request)

    @_rpc
    async def Decode(self, request: pb.DecodeRequest, context) -> pb.StepResponse:
        """One token for each listed running sequence, and the first of each joining one (one forward)."""
        return await self._run(self._decode, request)

    @_rpc
    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        """Forget finished or cancelled sequences; unknown ids are ignored."""
        await self._run(self.runner.release, list(request.request_ids))
        return pb.ReleaseResponse()

    @_rpc
    async def ClearCache(self, request: pb.ClearCacheRequest, context) -> pb.ClearCacheResponse:
        """Forget every sequence (router restart or recovery); loaded adapters stay."""
        await self._run(lambda: self.runner.release(list(self.runner.sequences)))
        return pb.ClearCacheResponse()

    # ---- on the step thread ---------------------------------------------------------------------

    def _prefill(self, request: pb.PrefillRequest) -> pb.StepResponse:
        self._check_healthy()
        requests = [self._prefill_request(seq) for seq in request.sequences]
        _check_unique([r.request_id for r in requests])
        if not requests:
            return pb.StepResponse()
        start = time.perf_counter_ns()
        outputs = self.runner.prefill(requests)
        return _step_response(outputs, time.perf_counter_ns() - start)

    def _decode(self, request: pb.DecodeRequest) -> pb.StepResponse:
        self._check_healthy()
        request_ids = list(request.request_ids)
        joining = [self._prefill_request(seq) for seq in request.joining]
        _check_unique([r.request_id for r in joining] + request_ids)
        grown = {}
        for table in request.grown:
            self._check_blocks(table.request_id, table.block_table)
            grown[table.request_id] = list(table.block_table)
        if not request_ids and not joining:
            return pb.StepResponse()
        start = time.perf_counter_ns()
        outputs = self.runner.step(joining, request_ids, grown)
        return _step_response(outputs, time.perf_counter_ns() - start)

    # ---- request conversion and checks ----------------------------------------------------------

    def _prefill_request(self, seq: pb.NewSequence) -> PrefillRequest:
        self._check_blocks(seq.request_id, seq.block_table)
        return PrefillRequest(
            request_id=seq.request_id,
            token_ids=list(seq.token_ids),
            block_table=list(seq.block_table),
            params=sampling_params(seq.request_id, seq.parameters if seq.HasField("parameters") else None),
            lora_slot=seq.lora_slot,
            prompt_logprobs=seq.prompt_logprobs,
            adapter_generation=seq.adapter_generation,
            num_generated=seq.num_generated,
            num_cached=seq.num_cached,
            more_chunks=seq.more_chunks,
        )

    def _check_healthy(self) -> None:
        if self.failure is not None:
            raise Unhealthy(f"rank {self.rank} runs no more steps since one failed: {self.failure}")

    def _check_blocks(self, request_id: int, block_table) -> None:
        """Block ids index the KV tensors directly, so one out of range would fail inside the step."""
        num_blocks = self.runner.kv.num_blocks
        bad = [b for b in block_table if b >= num_blocks]
        if bad:
            raise RequestError(f"request {request_id}: block {bad[0]} is outside the {num_blocks} KV blocks")


def sampling_params(request_id: int, p: pb.SamplingParameters | None) -> SamplingParams:
    """Proto -> SamplingParams. Unset parameters, and 0 in a field where 0 is invalid, mean the default."""
    if p is None:
        return SamplingParams()
    values = {f.name: getattr(p, f.name) for f in fields(SamplingParams)}
    for name in _ZERO_MEANS_NEUTRAL:
        if values[name] == 0:
            values[name] = 1.0
    try:
        return SamplingParams(**values)
    except ValueError as err:
        raise RequestError(f"request {request_id}: {err}") from None


def _check_unique(request_ids: list[int]) -> None:
    seen = set()
    for rid in request_ids:
        if rid in seen:
            raise RequestError(f"request {rid} appears twice in one step")
        seen.add(rid)


def _step_response(outputs: list[TokenOutput], forward_ns: int) -> pb.StepResponse:
    return pb.StepResponse(
        generations=[
            pb.Generation(
                request_id=o.request_id,
                token_id=o.token_id,
                logprob=o.logprob,
                top_token_ids=o.top_token_ids,
                top_logprobs=o.top_logprobs,
                prompt_logprobs=o.prompt_logprobs or [],
            )
            for o in outputs
        ],
        forward_ns=forward_ns,
    )


def _involved(request) -> str:
    """What a failed RPC was about, for the log: its request ids, or its adapter and slot."""
    if isinstance(request, pb.PrefillRequest):
        return f"request ids {[s.request_id for s in request.sequences]}"
    if isinstance(request, pb.DecodeRequest | pb.ReleaseRequest):
        return f"request ids {list(request.request_ids)}"
    if isinstance(request, pb.LoadAdapterRequest):
        return f"adapter {request.adapter_id!r} into slot {request.slot} as generation {request.generation}"
    if isinstance(request, pb.UnloadAdapterRequest):
        return f"slot {request.slot} generation {request.generation}"
    return "no request ids"


def _new_server(
    runner: ModelRunner,
    token: str | None = None,
    steps: ThreadPoolExecutor | None = None,
    reader: ReaderProcess | None = None,
) -> tuple[grpc.aio.Server, WorkerServicer]:
    servicer = WorkerServicer(runner, steps, reader)
    # A step with top_n_tokens near the vocab size can exceed gRPC's default 4 MiB, so message sizes are
    # not limited (the router's channel must match).
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)] if token is not None else None,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    pb_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    return server, servicer


async def start_server(
    runner: ModelRunner,
    uds: str | os.PathLike,
    steps: ThreadPoolExecutor | None = None,
    reader: ReaderProcess | None = None,
) -> tuple[grpc.aio.Server, WorkerServicer]:
    """Serve `runner` on the unix socket `uds`, which only this user may connect to (mode 0600).

    Raises OSError when the socket cannot be bound (missing directory, path taken by a non-socket).
    """
    path = Path(uds)
    if path.is_socket():
        path.unlink()  # left by a worker that did not exit cleanly
    server, servicer = _new_server(runner, steps=steps, reader=reader)
    # The socket is created with the umask; a restrictive one closes the gap until the chmod below.
    old_umask = os.umask(0o177)
    try:
        try:
            server.add_insecure_port(f"unix://{path}")
        except RuntimeError as err:  # grpc's "Failed to bind to address ..."
            raise OSError(f"cannot bind the unix socket {str(path)!r}") from err
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server, servicer


async def start_tcp_server(
    runner: ModelRunner,
    address: str,
    token: str,
    steps: ThreadPoolExecutor | None = None,
    reader: ReaderProcess | None = None,
) -> tuple[grpc.aio.Server, WorkerServicer]:
    """Serve `runner` on TCP `address` (`host:port`) to callers that present `token` (worker/auth.py).

    For the ranks of a multi-node group outside node 0, which the router reaches over the network.
    Raises OSError when the address cannot be bound (port taken, unknown host).
    """
    server, servicer = _new_server(runner, token, steps, reader)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc's "Failed to bind to address ..."
        raise OSError(f"cannot listen on {address}") from err
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, servicer


async def stop_server(server: grpc.aio.Server, servicer: WorkerServicer, grace_s: float) -> None:
    """Stop accepting RPCs, give those in flight `grace_s`, then finish the step in progress."""
    await server.stop(grace_s)
    await servicer.close()
