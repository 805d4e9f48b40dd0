"""The sharded gRPC client: every RPC goes to every tensor-parallel rank at once; rank 0's reply is used.

Ranks run each step in lockstep, so a call succeeds only when every rank answers. The first error from any
rank fails the call at once (the other ranks' calls are cancelled) and is raised as `WorkerError`
naming the rank, so a broken rank never leaves a request waiting on the others.

A rank that hangs answers nothing, so every Prefill and Decode has a deadline (router/step_deadline.py,
measured from the steps' own forward times). A step that misses it raises `RankHungError`, and the client
takes its ranks as hung for good: the rank may still finish the step, or never, and either way the ranks
are out of step with what the router believes. Every later call (Health included, so /health answers
503) fails at once with `RankHungError`, and `on_hung` is told once (the router tells the launcher).

The ranks on this node are reached over unix sockets; in a multi-node group, those of the other nodes over
TCP, with the group's token on every call as `authorization: Bearer <token>` metadata (worker/auth.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from proto import generate_pb2 as pb
from proto.generate_pb2_grpc import TextGenerationServiceStub
from router.step_deadline import StepDeadline

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    # Prompt logprobs of long prompts exceed gRPC's 4 MiB default.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Workers take minutes to start; reconnect every second instead of backing off to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class WorkerError(Exception):
    """A rank failed an RPC (or could not be reached)."""

    def __init__(self, method: str, rank: int, detail: str, code: grpc.StatusCode | None = None):
        super().__init__(f"{method} failed on rank {rank}: {detail}")
        self.method = method
        self.rank = rank
        self.detail = detail
        self.code = code


class RankHungError(WorkerError):
    """A step got no answer within its deadline: the rank named (or one it waits on in a collective) hangs."""


class ShardedClient:
    def __init__(
        self,
        uds_paths: Sequence[str],
        tcp_addresses: Sequence[str] = (),
        token: str | None = None,
        deadline: StepDeadline | None = None,
        on_hung: Callable[[RankHungError], None] | None = None,
    ):
        """Ranks 0..len(uds_paths)-1 on unix sockets, then the ranks at `tcp_addresses` (`host:port`).
        Steps get no deadline without `deadline` (tests with fake workers)."""
        if not uds_paths and not tcp_addresses:
            raise ValueError("at least one worker rank is needed")
        self.uds_paths = list(uds_paths)
        self.targets = [f"unix://{path}" for path in uds_paths] + list(tcp_addresses)
        self._channels = [grpc.aio.insecure_channel(t, options=_CHANNEL_OPTIONS) for t in self.targets]
        self._stubs = [TextGenerationServiceStub(ch) for ch in self._channels]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.deadline = deadline
        self.on_hung = on_hung
        self.hung: RankHungError | None = None  # the step that found the ranks hung; None while they answer

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Send `request` to every rank; return rank 0's reply, or raise the first rank error."""
        self._check_not_hung(method)
        calls: list[Callable[..., Awaitable[Any]]] = [getattr(stub, method) for stub in self._stubs]
        tasks = [
            asyncio.ensure_future(call(request, timeout=timeout, metadata=self._metadata)) for call in calls
        ]
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise self._error(method, tasks.index(task), task.exception())
            return tasks[0].result()
        finally:
            for task in tasks:
                task.cancel()

    async def _call_each(
        self, method: str, request: Any, ranks: Sequence[int], timeout: float | None
    ) -> list[Any]:
        """Send `request` to `ranks` and wait for all of them: each one's reply or WorkerError."""
        if self.hung is not None:
            return [RankHungError(method, rank, self.hung.detail, self.hung.code) for rank in ranks]

        async def one(rank: int) -> Any:
            call = getattr(self._stubs[rank], method)
            try:
                return await call(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                return self._error(method, rank, e)

        return list(await asyncio.gather(*(one(rank) for rank in ranks)))

    async def _step(self, method: str, request: Any, num_tokens: int) -> pb.StepResponse:
        """A Prefill or Decode call within its deadline, whose forward time then refines the deadline."""
        timeout = None if self.deadline is None else self.deadline.timeout_s(num_tokens)
        try:
            reply = await self._call(method, request, timeout=timeout)
        except WorkerError as e:
            if timeout is None or isinstance(e, RankHungError) or e.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise  # not this step's deadline (a hang found earlier fails every call at once)
            raise self._found_hung(e, timeout) from None
        if self.deadline is not None:
            self.deadline.observe(num_tokens, reply.forward_ns)
        return reply

    def _found_hung(self, error: WorkerError, timeout: float) -> RankHungError:
        detail = f"no answer within the step's {timeout:.1f} s deadline: the rank is taken as hung"
        self.hung = RankHungError(error.method, error.rank, detail, error.code)
        log.critical("%s; every call fails from now on, restart the workers", self.hung)
        if self.on_hung is not None:
            self.on_hung(self.hung)
        return self.hung

    def _check_not_hung(self, method: str) -> None:
        if self.hung is not None:
            raise RankHungError(method, self.hung.rank, self.hung.detail, self.hung.code)

    @staticmethod
    def _error(method: str, rank: int, exc: BaseException) -> WorkerError:
        if isinstance(exc, grpc.aio.AioRpcError):
            detail = exc.details() or exc.code().name
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = f"{exc.code().name}: {detail}"
            return WorkerError(method, rank, detail, exc.code())
        return WorkerError(method, rank, repr(exc))

    # ---- RPCs -----------------------------------------------------------------------------------

    async def info(self) -> pb.InfoResponse:
        return await self._call("Info", pb.InfoRequest())

    async def health(self, timeout: float | None = None) -> None:
        await self._call("Health", pb.HealthRequest(), timeout=timeout)

    async def wait_ready(self, timeout: float, poll_s: float = 0.2) -> None:
        """Poll Health until every rank answers; raise TimeoutError with the last failure after `timeout`.

        A rank that refuses the worker token (UNAUTHENTICATED) will never answer: its WorkerError is raised
        at once."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                await self.health(timeout=max(min(remaining, 5.0), 0.1))
                return
            except WorkerError as e:
                if e.code == grpc.StatusCode.UNAUTHENTICATED:
                    raise
                if time.monotonic() + poll_s >= deadline:
                    raise TimeoutError(f"workers not ready after {timeout:.0f} s ({e})") from None
                log.debug("waiting for workers: %s", e)
            await asyncio.sleep(poll_s)

    async def load_adapter(
        self, slot: int, adapter_id: str, path: str, generation: int, timeout: float | None = None
    ) -> list[pb.LoadAdapterResponse | WorkerError]:
        """Load on every rank; each rank's reply or error, in rank order (a rollback needs to know which
        ranks hold the adapter, so no call is cancelled when another fails)."""
        request = pb.LoadAdapterRequest(slot=slot, adapter_id=adapter_id, path=path, generation=generation)
        return await self._call_each("LoadAdapter", request, range(self.world_size), timeout)

    async def unload_adapter(
        self,
        slot: int,
        generation: int,
        ranks: Sequence[int] | None = None,
        timeout: float | None = None,
        keep: bool = False,
    ) -> list[pb.UnloadAdapterResponse | WorkerError]:
        """Empty `slot` (if it holds load `generation`) on `ranks` (default all), keeping its weights in
        the host tier with `keep`. Each rank's reply or error."""
        ranks = range(self.world_size) if ranks is None else ranks
        request = pb.UnloadAdapterRequest(slot=slot, generation=generation, keep=keep)
        return await self._call_each("UnloadAdapter", request, ranks, timeout)

    async def drop_host_copy(
        self, adapter_id: str, timeout: float | None = None
    ) -> list[pb.DropHostCopyResponse | WorkerError]:
        """Free every rank's host-tier copy of `adapter_id`. Each rank's reply or error."""
        request = pb.DropHostCopyRequest(adapter_id=adapter_id)
        return await self._call_each("DropHostCopy", request, range(self.world_size), timeout)

    async def prefill(self, sequences: Sequence[pb.NewSequence]) -> pb.StepResponse:
        num_tokens = sum(len(s.token_ids) for s in sequences)
        return await self._step("Prefill", pb.PrefillRequest(sequences=sequences), num_tokens)

    async def decode(
        self,
        request_ids: Sequence[int],
        joining: Sequence[pb.NewSequence] = (),
        grown: Sequence[pb.BlockTable] = (),
    ) -> pb.StepResponse:
        request = pb.DecodeRequest(request_ids=request_ids, joining=joining, grown=grown)
        num_tokens = len(request_ids) + sum(len(s.token_ids) for s in joining)
        return await self._step("Decode", request, num_tokens)

    async def release(self, request_ids: Sequence[int], timeout: float | None = None) -> None:
        await self._call("Release", pb.ReleaseRequest(request_ids=request_ids), timeout=timeout)

    async def clear_cache(self) -> None:
        await self._call("ClearCache", pb.ClearCacheRequest())
