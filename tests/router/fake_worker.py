"""A scripted worker rank implementing proto/generate.proto, for router tests (grpc.aio, unix sockets).

Each sequence generates `script[lora_slot]` (token ids) one token per step, then EOS, so the text a
request gets is known in advance and depends on its adapter. Logprobs are -(step + 1) / 10, shifted by
the seed when sampling so best_of has something to choose. The fake checks what a real worker would
(unknown or duplicate ids, block tables too small for the tokens, unloaded slots, two live sequences
sharing a block) and records every request it receives.
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
    params: pb.SamplingParameters
    generated: list[int] = field(default_factory=list)

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
        script: dict[int, list[int]],
        num_blocks: int = 64,
        block_size: int = 4,
        num_adapter_slots: int = 4,
        max_position: int = 512,
        token_shift: int = 0,
    ):
        self.rank = rank
        self.world_size = world_size
        self.script = script
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_adapter_slots = num_adapter_slots
        self.max_position = max_position
        self.token_shift = token_shift  # other ranks may answer differently: the router must use rank 0
        self.calls: list[tuple[str, object]] = []
        self.sequences: dict[int, FakeSequence] = {}
        self.adapters: dict[int, str] = {}
        self.step_delay = 0.0
        self.healthy = True
        self.fail_next: dict[str, str] = {}  # method -> error detail, for the next call only
        self.failing_adapters: set[str] = set()
        self.drop_next: set[str] = set()  # methods whose next reply leaves the generations out
        self.fail_at_token: int | None = None  # Decode fails when a sequence would make its token k (1-based)

    # ---- helpers --------------------------------------------------------------------------------

    async def _enter(self, method: str, request, context) -> None:
        self.calls.append((method, request))
        if method in self.fail_next:
            await context.abort(grpc.StatusCode.INTERNAL, self.fail_next.pop(method))

    def requests(self, method: str) -> list:
        return [r for m, r in self.calls if m == method]

    def _next(self, seq: FakeSequence) -> pb.Generation:
        step = len(seq.generated)
        script = self.script.get(seq.slot, [])
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
        if request.adapter_id in self.failing_adapters:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{request.path}: adapter_config.json not found"
            )
        if not 1 <= request.slot <= self.num_adapter_slots:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no slot {request.slot}")
        self.adapters[request.slot] = request.adapter_id
        return pb.LoadAdapterResponse(
            lora_rank=8 * request.slot, alpha=16.0, target_modules=["q_proj", "v_proj"], load_ns=1000
        )

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
        for rid in request.request_ids:
            seq = self.sequences.get(rid)
            if seq is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid} is not running")
            if seq.num_cached + 1 > len(seq.block_table) * self.block_size:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: out of blocks")
            if self.fail_at_token is not None and len(seq.generated) + 1 == self.fail_at_token:
                await context.abort(grpc.StatusCode.INTERNAL, "injected failure")
        out = self._start(request.joining) + [self._next(self.sequences[rid]) for rid in request.request_ids]
        if "Decode" in self.drop_next:
            self.drop_next.remove("Decode")
            out = []
        return pb.StepResponse(generations=out, forward_ns=1)

    async def _check_new(self, sequences, context) -> None:
        used = {b for s in self.sequences.values() for b in s.block_table}
        for new in sequences:
            problem = None
            if new.request_id in self.sequences:
                problem = f"request {new.request_id} is already running"
            elif len(new.block_table) * self.block_size < len(new.token_ids):
                problem = f"request {new.request_id}: block table too small"
            elif used & set(new.block_table) or len(set(new.block_table)) != len(new.block_table):
                problem = f"request {new.request_id}: blocks {sorted(new.block_table)} are in use"
            elif not all(0 <= b < self.num_blocks for b in new.block_table):
                problem = f"request {new.request_id}: block out of range"
            elif new.lora_slot and new.lora_slot not in self.adapters:
                problem = f"request {new.request_id}: no adapter in slot {new.lora_slot}"
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            used |= set(new.block_table)

    def _start(self, sequences) -> list:
        out = []
        for new in sequences:
            seq = FakeSequence(
                new.request_id, list(new.token_ids), list(new.block_table), new.lora_slot, new.parameters
            )
            self.sequences[new.request_id] = seq
            gen = self._next(seq)
            if new.prompt_logprobs:
                gen.prompt_logprobs.extend([-0.5] * (len(new.token_ids) - 1))
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
