"""A scripted worker rank implementing proto/generate.proto, for router tests (grpc.aio, unix sockets).

Each sequence generates its adapter's script (token ids) one token per step, then EOS, so the text a
request gets is known in advance and depends on the adapter whose weights its slot holds: `script` by
adapter id, else by slot (0: the base model), else `default_script(adapter_id)`. Logprobs are
-(step + 1) / 10, shifted by the seed when sampling so best_of has something to choose. The fake checks
what a real worker would (unknown or duplicate ids, block tables too small for the tokens, two live
sequences sharing a block, a grown table that does not extend the old one) and follows the adapter
rules of proto/generate.proto: LoadAdapter only into an empty slot, with a generation > 0;
UnloadAdapter only with the slot's generation and while no running sequence uses the slot; a row whose
`adapter_generation` is not its slot's fails the step loudly. A recompute (`num_generated`) goes on
with its script where it stopped. A chunked prefill (`num_cached`, `more_chunks`) is checked as the
real worker checks it: chunks in order, each extending the table, no decode and no token before the
last one, which starts the script (a recompute's `num_generated` counts over all the chunks). It
records every request it receives; `load_delay`, `load_gate` and `failing_adapters` slow, hold or fail
loads.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import grpc

from proto import generate_pb2 as pb
from proto.generate_pb2_grpc import TextGenerationServiceServicer, add_TextGenerationServiceServicer_to_server

EOS_ID = 2


@dataclass
class FakeSequence:
    request_id: int
    prompt: list[int]
    block_table: list[int]
    slot: int
    adapter_id: str | None
    params: pb.SamplingParameters
    generated: list[int] = field(default_factory=list)
    more_chunks: bool = False  # its prefill has chunks still to come: it neither decodes nor samples

    @property
    def num_cached(self) -> int:
        # The prompt plus every generated token except the last (not yet fed back).
        return len(self.prompt) + max(len(self.generated) - 1, 0)


class FakeWorker(TextGenerationServiceServicer):
    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        *,
        script: dict[int | str, list[int]],
        default_script=None,
        num_blocks: int = 64,
        block_size: int = 4,
        num_adapter_slots: int = 4,
        max_position: int = 512,
        token_shift: int = 0,
    ):
        self.rank = rank
        self.world_size = world_size
        self.script = script
        self.default_script = default_script  # adapter id -> token ids, for adapters `script` lacks
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_adapter_slots = num_adapter_slots
        self.max_position = max_position
        self.token_shift = token_shift  # other ranks may answer differently: the router must use rank 0
        self.calls: list[tuple[str, object]] = []
        self.sequences: dict[int, FakeSequence] = {}
        self.slots: dict[int, tuple[str, int]] = {}  # slot -> (adapter id, generation)
        self.pool_bytes = 10**9  # the adapter pool: a load past it is refused with RESOURCE_EXHAUSTED
        self.host_kept: set[str] = set()  # adapters evicted into the host tier (no budget modelled)
        self.load_delay = 0.0
        self.load_gate: asyncio.Event | None = None  # loads wait for it while set to an unset Event
        self.mismatches: list[str] = []  # rows refused for naming another generation than their slot's
        self.step_delay = 0.0
        self.healthy = True
        self.fail_next: dict[str, str] = {}  # method -> error detail, for the next call only
        self.fail_next_join: str | None = None  # error detail for the next Decode that carries joiners
        self.failing_adapters: set[str] = set()
        self.drop_next: set[str] = set()  # methods whose next reply leaves the generations out
        self.fail_at_token: int | None = None  # Decode fails when a sequence would make its token k (1-based)

    # ---- helpers --------------------------------------------------------------------------------

    async def _enter(self, method: str, request, context) -> None:
        self.calls.append((method, request))
        if method in self.fail_next:
            await context.abort(grpc.StatusCode.INTERNAL, self.fail_next.pop(method))
        if method == "Decode" and request.joining and self.fail_next_join is not None:
            detail, self.fail_next_join = self.fail_next_join, None
            await context.abort(grpc.StatusCode.INTERNAL, detail)

    def requests(self, method: str) -> list:
        return [r for m, r in self.calls if m == method]

    @property
    def adapters(self) -> dict[int, str]:
        """slot -> the adapter id it holds."""
        return {slot: adapter_id for slot, (adapter_id, _) in self.slots.items()}

    def _script(self, slot: int, adapter_id: str | None) -> list[int]:
        if adapter_id is not None and adapter_id in self.script:
            return self.script[adapter_id]
        if slot in self.script:
            return self.script[slot]
        if adapter_id is not None and self.default_script is not None:
            return self.default_script(adapter_id)
        return []

    def _next(self, seq: FakeSequence) -> pb.Generation:
        step = len(seq.generated)
        script = self._script(seq.slot, seq.adapter_id)
        token = script[step] + self.token_shift if step < len(script) else EOS_ID
        logprob = -(step + 1) / 10
        if seq.params.do_sample:
            logprob -= (seq.params.seed % 7) / 100
        seq.generated.append(token)
        n = seq.params.top_n_tokens
        return pb.Generation(
            request_id=seq.request_id,
            token_id=token,
            logprob=logprob,
            top_token_ids=[token + i for i in range(n)],
            top_logprobs=[logprob - i for i in range(n)],
        )

    # ---- RPCs -----------------------------------------------------------------------------------

    async def Info(self, request, context):
        await self._enter("Info", request, context)
        return pb.InfoResponse(
            model_type="llama",
            architecture="LlamaForCausalLM",
            dtype="float32",
            device_type="cpu",
            vocab_size=300,
            max_position_embeddings=self.max_position,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            num_adapter_slots=self.num_adapter_slots,
            max_lora_rank=64,
            world_size=self.world_size,
            rank=self.rank,
        )

    async def Health(self, request, context):
        await self._enter("Health", request, context)
        if not self.healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the last step failed")
        return pb.HealthResponse()

    async def LoadAdapter(self, request, context):
        await self._enter("LoadAdapter", request, context)
        if self.load_gate is not None:
            await self.load_gate.wait()
        await asyncio.sleep(self.load_delay)
        if request.adapter_id in self.failing_adapters:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{request.path}: adapter_config.json not found"
            )
        if not 1 <= request.slot <= self.num_adapter_slots:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no slot {request.slot}")
        if request.generation == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "generation must be > 0")
        if request.slot in self.slots:
            held, generation = self.slots[request.slot]
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"slot {request.slot} holds {held!r} (generation {generation}); unload it first",
            )
        weight_bytes = 1000 * request.slot
        if self._pool_used() + weight_bytes > self.pool_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"adapter {request.adapter_id!r}: adapter pool full "
                f"({self._pool_used()} of {self.pool_bytes})",
            )
        self.slots[request.slot] = (request.adapter_id, request.generation)
        tier = "host" if request.adapter_id in self.host_kept else "disk"
        self.host_kept.discard(request.adapter_id)
        return pb.LoadAdapterResponse(
            lora_rank=8 * request.slot,
            alpha=16.0,
            target_modules=["q_proj", "v_proj"],
            load_ns=1000,
            weight_bytes=weight_bytes,
            tier=tier,
            memory=self._memory(),
        )

    def _pool_used(self) -> int:
        return sum(1000 * slot for slot in self.slots)

    def _memory(self) -> pb.AdapterMemory:
        return pb.AdapterMemory(pool_bytes_used=self._pool_used(), pool_bytes_total=self.pool_bytes)

    async def DropHostCopy(self, request, context):
        await self._enter("DropHostCopy", request, context)
        dropped = request.adapter_id in self.host_kept
        self.host_kept.discard(request.adapter_id)
        return pb.DropHostCopyResponse(memory=self._memory(), dropped=dropped)

    async def UnloadAdapter(self, request, context):
        await self._enter("UnloadAdapter", request, context)
        held = self.slots.get(request.slot)
        if held is None or held[1] != request.generation:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"slot {request.slot} does not hold generation {request.generation} (it holds {held})",
            )
        users = sorted(s.request_id for s in self.sequences.values() if s.slot == request.slot)
        if users:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"slot {request.slot} is in use by requests {users}"
            )
        del self.slots[request.slot]
        if request.keep:
            self.host_kept.add(held[0])
        return pb.UnloadAdapterResponse(memory=self._memory(), host_kept=request.keep)

    async def Prefill(self, request, context):
        await self._enter("Prefill", request, context)
        await asyncio.sleep(self.step_delay)
        await self._check_new(request.sequences, context)
        return pb.StepResponse(generations=self._start(request.sequences), forward_ns=1)

    async def Decode(self, request, context):
        """Joining sequences' first tokens, then the running ones'; like the real worker, everything is
        checked before any state changes."""
        await self._enter("Decode", request, context)
        await asyncio.sleep(self.step_delay)
        await self._check_new(request.joining, context)
        grown = {g.request_id: list(g.block_table) for g in request.grown}
        await self._check_grown(grown, context)
        for rid in request.request_ids:
            seq = self.sequences.get(rid)
            if seq is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid} is not running")
            if seq.more_chunks:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid} is still prefilling")
            if seq.num_cached + 1 > len(grown.get(rid, seq.block_table)) * self.block_size:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: out of blocks")
            if self.fail_at_token is not None and len(seq.generated) + 1 == self.fail_at_token:
                await context.abort(grpc.StatusCode.INTERNAL, "injected failure")
        for rid, table in grown.items():
            self.sequences[rid].block_table = table
        out = self._start(request.joining) + [self._next(self.sequences[rid]) for rid in request.request_ids]
        if "Decode" in self.drop_next:
            self.drop_next.remove("Decode")
            out = []
        return pb.StepResponse(generations=out, forward_ns=1)

    async def _check_new(self, sequences, context) -> None:
        used = {b for s in self.sequences.values() for b in s.block_table}
        for new in sequences:
            problem = None
            old = self.sequences.get(new.request_id)
            if new.num_cached:
                problem = self._chunk_problem(new, old)
                used -= set(old.block_table) if old is not None else set()
            elif old is not None:
                problem = f"request {new.request_id} is already running"
            if problem is None:
                problem = self._row_problem(new, used)
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            used |= set(new.block_table)

    def _row_problem(self, new, used: set[int]) -> str | None:
        """What is wrong with a prefill row's blocks or adapter, if anything."""
        if len(new.block_table) * self.block_size < new.num_cached + len(new.token_ids):
            return f"request {new.request_id}: block table too small"
        if used & set(new.block_table) or len(set(new.block_table)) != len(new.block_table):
            return f"request {new.request_id}: blocks {sorted(new.block_table)} are in use"
        if not all(0 <= b < self.num_blocks for b in new.block_table):
            return f"request {new.request_id}: block out of range"
        if new.lora_slot and new.lora_slot not in self.slots:
            return f"request {new.request_id}: no adapter in slot {new.lora_slot}"
        if new.adapter_generation != (self.slots[new.lora_slot][1] if new.lora_slot else 0):
            problem = (
                f"request {new.request_id}: slot {new.lora_slot} holds generation "
                f"{self.slots.get(new.lora_slot, (None, 0))[1]}, the row expects {new.adapter_generation}"
            )
            self.mismatches.append(problem)
            return problem
        return None

    @staticmethod
    def _chunk_problem(new, old: FakeSequence | None) -> str | None:
        """What is wrong with a chunk after the first, if anything."""
        if old is None or not old.more_chunks or len(old.prompt) != new.num_cached:
            return f"request {new.request_id}: chunk at {new.num_cached} continues nothing prefilling"
        if new.block_table[: len(old.block_table)] != old.block_table:
            return f"request {new.request_id}: the chunk's table does not extend its table"
        return None

    async def _check_grown(self, grown: dict[int, list[int]], context) -> None:
        for rid, table in grown.items():
            seq = self.sequences.get(rid)
            others = {b for s in self.sequences.values() if s.request_id != rid for b in s.block_table}
            if seq is None or table[: len(seq.block_table)] != seq.block_table:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: bad grown table")
            if others & set(table) or len(set(table)) != len(table):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: grown into used")

    def _start(self, sequences) -> list:
        out = []
        for new in sequences:
            adapter_id = self.slots[new.lora_slot][0] if new.lora_slot else None
            earlier = self.sequences[new.request_id].prompt if new.num_cached else []
            tokens = earlier + list(new.token_ids)
            # A recompute (num_generated > 0) goes on with its script where it was preempted.
            split = len(tokens) - new.num_generated if not new.more_chunks else len(tokens)
            seq = FakeSequence(
                new.request_id,
                tokens[:split],
                list(new.block_table),
                new.lora_slot,
                adapter_id,
                new.parameters,
                generated=tokens[split:],
                more_chunks=new.more_chunks,
            )
            self.sequences[new.request_id] = seq
            if new.more_chunks:
                continue
            gen = self._next(seq)
            if new.prompt_logprobs:
                gen.prompt_logprobs.extend([-0.5] * (len(tokens) - 1))
            out.append(gen)
        return out

    async def Release(self, request, context):
        await self._enter("Release", request, context)
        for rid in request.request_ids:
            self.sequences.pop(rid, None)
        return pb.ReleaseResponse()

    async def ClearCache(self, request, context):
        await self._enter("ClearCache", request, context)
        self.sequences.clear()
        return pb.ClearCacheResponse()


@contextlib.asynccontextmanager
async def serve_fakes(sock_dir: str, world_size: int, **kwargs):
    """Start `world_size` fake ranks on unix sockets; yields (fakes, socket paths)."""
    fakes, servers, paths = [], [], []
    try:
        for rank in range(world_size):
            fake = FakeWorker(rank, world_size, token_shift=rank * 100, **kwargs)
            server = grpc.aio.server()
            add_TextGenerationServiceServicer_to_server(fake, server)
            path = f"{sock_dir}/rank{rank}.sock"
            server.add_insecure_port(f"unix://{path}")
            await server.start()
            fakes.append(fake)
            servers.append(server)
            paths.append(path)
        yield fakes, paths
    finally:
        await asyncio.gather(*(s.stop(grace=None) for s in servers))
