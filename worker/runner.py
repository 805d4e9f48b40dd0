"""The model runner of one rank: prepare a step's tensors, run the model, sample.

The caller (the gRPC servicer, or a test) owns scheduling: it decides which sequences run, and which
KV blocks and adapter slot each one uses. The runner keeps only per-sequence execution state (tokens in
the cache, the last token, the sampling state, the adapter generation it was prefilled with), so a
decode step carries just request ids. All ranks receive the same calls and stay in lockstep.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from transformers import AutoConfig

from worker.config import WorkerConfig
from worker.errors import RequestError
from worker.kernels import select_attention_kernel, select_fused_ops, select_lora_ops
from worker.kv_cache import KVCache, blocks_for, bytes_per_block
from worker.lora.adapter import LoraAdapter, ModuleShape
from worker.lora.pages import page_elems_for
from worker.lora.pool import AdapterPool
from worker.lora.reader import ReadSpec
from worker.lora.sites import LoraSite
from worker.lora.slots import AdapterSlots, PreparedAdapter, ResidentAdapter, prepare_adapter
from worker.memory_plan import GIB, CudaMemoryMeter, kv_cache_budget, memory_meter_for
from worker.models.llama import LlamaForCausalLM, head_dim_of
from worker.parallel import ParallelContext
from worker.sampler import Sampler, SequenceSamplingState, prompt_logprobs
from worker.sequence import PrefillRequest, SequenceState, StepSequences, TokenOutput
from worker.step_checks import StepChecks
from worker.step_plan import StepPlanner
from worker.weights import CheckpointWeights

__all__ = ["ModelRunner", "PrefillRequest", "RequestError", "TokenOutput"]

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: WorkerConfig,
        ctx: ParallelContext | None = None,
        memory_meter: CudaMemoryMeter | None = None,
    ):
        self.config = config
        self.ctx = ctx or ParallelContext()
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        hf_config = AutoConfig.from_pretrained(config.model_dir)
        self.hf_config = hf_config
        build_cache = Path(config.kernel_cache_dir) if config.kernel_cache_dir else None
        self.lora_ops = select_lora_ops(self.device, config.native_cpu_kernels, build_cache)
        self.lora_dtype = self.lora_ops.pool_dtype(self.dtype)
        self.attention_kernel = select_attention_kernel(self.device, config.native_cpu_kernels, build_cache)
        self.fused_ops = select_fused_ops(self.device, config.native_cpu_kernels, build_cache)
        lora = config.max_adapters > 0
        self.model = LlamaForCausalLM(
            hf_config, self.ctx, self.dtype, self.device, lora, self.attention_kernel, self.fused_ops
        )
        with torch.no_grad():
            self.model.load(CheckpointWeights(config.model_dir, self.dtype, self.device))
        self.lora_sites: list[LoraSite] = [site for layer in self.model.layers for site in layer.lora_sites()]
        self.slots = AdapterSlots(config.max_adapters, self._adapter_pool() if lora else None)
        self.sampler = Sampler()
        self.sequences: dict[int, SequenceState] = {}
        self.checks = StepChecks(self.sequences, self.slots, config.block_size, hf_config.vocab_size)
        self.planner = StepPlanner(config.block_size, self.device, self.lora_ops, self.slots, self.lora_sites)
        self.kv = self._allocate_kv_cache(memory_meter)

    @functools.cached_property
    def _block_shape(self) -> tuple[int, int, int, int, torch.dtype]:
        """(layers, block size, KV heads on this rank, head dim, dtype) of one KV cache block."""
        c = self.hf_config
        num_kv_heads = self.ctx.kv_heads(c.num_key_value_heads)[1]
        return c.num_hidden_layers, self.config.block_size, num_kv_heads, head_dim_of(c), self.dtype

    def _kv_cache(self, num_blocks: int) -> KVCache:
        return KVCache.allocate(num_blocks, *self._block_shape, self.device)

    def _allocate_kv_cache(self, meter: CudaMemoryMeter | None) -> KVCache:
        """The KV cache of `num_blocks`, or of as many blocks as fit `kv_cache_bytes`, or, with neither,
        of what the profiled step leaves of `memory_fraction` of the device (`worker/memory_plan.py`)."""
        config, block_shape = self.config, self._block_shape
        if config.num_blocks:
            return self._kv_cache(config.num_blocks)
        if config.kv_cache_bytes is not None:
            return self._kv_cache(KVCache.blocks_for_budget(config.kv_cache_bytes, *block_shape))
        meter = meter or memory_meter_for(self.device)
        profile_blocks = self._profile_step(meter)
        budget = kv_cache_budget(
            meter.read(), config.memory_fraction, profile_blocks * bytes_per_block(*block_shape)
        )
        # Ranks measure apart; the router hands out one set of block numbers, so all take the fewest.
        num_blocks = self.ctx.min_over_ranks(KVCache.blocks_for_budget(budget, *block_shape), self.device)
        log.info("KV cache: %d blocks planned from device memory (%.2f GiB)", num_blocks, budget / GIB)
        return self._kv_cache(num_blocks)

    def _profile_step(self, meter: CudaMemoryMeter) -> int:
        """Run the step that holds the most activation memory the router may send: `profile_tokens`
        prompt rows, all with prompt logprobs (logits for every row), on a KV cache just big enough,
        then free it all; returns that cache's blocks. Rotary tables and kernel workspaces the step
        creates stay, as they would after any first step."""
        tokens = min(self.config.profile_tokens, self.hf_config.max_position_embeddings)
        num_blocks = blocks_for(tokens, self.config.block_size)
        meter.reset_peak()
        self.kv = self._kv_cache(num_blocks)
        profile = PrefillRequest(-1, [0] * tokens, list(range(num_blocks)), prompt_logprobs=True)
        self.step([profile], [])
        self.release([profile.request_id])
        del self.kv
        meter.release_cached()
        return num_blocks

    def _adapter_pool(self) -> AdapterPool:
        """The pool of `adapter_memory_bytes`, in pages of rows of every width the sites read."""
        widths = sorted({w for site in self.lora_sites for w in site.widths})
        page_elems = page_elems_for(widths)
        element_size = torch.empty((), dtype=self.lora_dtype).element_size()
        num_pages = self.config.adapter_memory_bytes // (page_elems * element_size)
        return AdapterPool(num_pages, page_elems, widths, self.lora_dtype, self.device)

    # ---- adapters -------------------------------------------------------------------------------

    def module_shapes(self) -> dict[str, ModuleShape]:
        """Full (unsharded) shapes of the LoRA-capable base modules, for adapter validation."""
        c = self.hf_config
        hd = head_dim_of(c)
        q, kv, h, m = (
            c.num_attention_heads * hd,
            c.num_key_value_heads * hd,
            c.hidden_size,
            c.intermediate_size,
        )
        return {
            "q_proj": ModuleShape(h, q),
            "k_proj": ModuleShape(h, kv),
            "v_proj": ModuleShape(h, kv),
            "o_proj": ModuleShape(q, h),
            "gate_proj": ModuleShape(h, m),
            "up_proj": ModuleShape(h, m),
            "down_proj": ModuleShape(m, h),
        }

    @property
    def adapters(self) -> dict[int, ResidentAdapter]:
        """slot -> the adapter it holds, with its load generation."""
        return self.slots.resident

    @functools.cached_property
    def _read_spec(self) -> ReadSpec:
        return ReadSpec(
            num_layers=self.hf_config.num_hidden_layers,
            module_shapes=self.module_shapes(),
            sites=list(self.lora_sites),
            dtype=self.lora_dtype,
            max_lora_rank=self.config.max_lora_rank,
            pin=self.device.type == "cuda",  # so that placing it is an asynchronous copy on the step's stream
        )

    def read_spec(self) -> ReadSpec:
        """What the adapter reader needs of this rank's model to read an adapter for it (fixed once the
        model is built: made once)."""
        return self._read_spec

    def prepare_adapter(self, adapter: LoraAdapter) -> PreparedAdapter:
        """`adapter` sharded, scaled and cast for this rank's pool. Changes no state (the servicer's
        reader does the same off the step thread, `worker/lora/reader.py`)."""
        spec = self.read_spec()
        return prepare_adapter(adapter, spec.sites, spec.dtype, spec.max_lora_rank, spec.pin)

    def place_adapter(self, slot: int, generation: int, prepared: PreparedAdapter) -> ResidentAdapter:
        """Copy a prepared adapter into the empty `slot` (1..max_adapters) as load `generation` (> 0)."""
        return self.slots.place(slot, generation, prepared)

    def load_adapter(self, slot: int, adapter: LoraAdapter, generation: int) -> ResidentAdapter:
        """`prepare_adapter` then `place_adapter`, in one call."""
        return self.place_adapter(slot, generation, self.prepare_adapter(adapter))

    def unload_adapter(
        self, slot: int, generation: int, keep: bool = False
    ) -> tuple[ResidentAdapter, PreparedAdapter | None]:
        """Empty `slot`, which must hold load `generation` and no running sequence may use; returns
        what it held (and, with `keep`, its weights read back for the host tier). Its pool rows are
        NaN-filled and freed, so nothing can read the weights any more."""
        users = [rid for rid, s in self.sequences.items() if s.lora_slot == slot]
        return self.slots.unload(slot, generation, users, keep)

    # ---- steps ----------------------------------------------------------------------------------

    def prefill(self, requests: list[PrefillRequest]) -> list[TokenOutput]:
        """Run the whole prompt of each new sequence, then sample its first token."""
        return self.step(requests, [])

    def decode(self, request_ids: list[int], grown: dict[int, list[int]] | None = None) -> list[TokenOutput]:
        """One token for each running sequence."""
        return self.step([], request_ids, grown)

    @torch.inference_mode()
    def step(
        self, new: list[PrefillRequest], request_ids: list[int], grown: dict[int, list[int]] | None = None
    ) -> list[TokenOutput]:
        """One forward over the prompt of each `new` sequence (sampling its first token) and one
        token of each running sequence in `request_ids`. Outputs: the new sequences' in the order given,
        then the running ones'. A `new` entry may be one chunk of a chunked prefill (num_cached,
        more_chunks): every chunk but the last extends the sequence's cache and returns no output.
        `grown`: request id -> the whole new block table of a running sequence whose table grew (the
        router hands out blocks as sequences grow).

        With both kinds (a join step), newcomers do not pause the running batch for a forward of their
        own: every linear layer reads its weights once for all rows. Everything is checked before any
        state changes, so a bad request fails the call and leaves every sequence as it was.
        """
        grown = grown or {}
        running = self.checks.step(new, request_ids, grown)
        for rid, table in grown.items():
            self.sequences[rid].block_table = list(table)
        rows = self._order_rows(new, request_ids, running)
        token_ids, batch = self.planner.plan(rows)
        logits = self.model(token_ids, batch, self.kv)  # [num logits rows, vocab]
        outputs = self._collect(rows, logits)
        return self._in_request_order(outputs, [r.request_id for r in new] + list(request_ids))

    def release(self, request_ids: list[int]) -> None:
        """Forget finished or cancelled sequences (their blocks are the caller's to reuse)."""
        for rid in request_ids:
            self.sequences.pop(rid, None)

    # ---- step phases ----------------------------------------------------------------------------

    def _order_rows(
        self, new: list[PrefillRequest], request_ids: list[int], running: list[SequenceState]
    ) -> StepSequences:
        """The step's sequences in the order the LoRA ops want their rows in, new and running ones apart."""
        slot_lora_ranks = {slot: adapter.lora_rank for slot, adapter in self.adapters.items()}
        new_order = self.lora_ops.row_order([r.lora_slot for r in new], slot_lora_ranks)
        order = self.lora_ops.row_order([s.lora_slot for s in running], slot_lora_ranks)
        return StepSequences(
            new=[new[i] for i in new_order],
            running_ids=[request_ids[i] for i in order],
            running=[running[i] for i in order],
        )

    def _collect(self, rows: StepSequences, logits: torch.Tensor) -> list[TokenOutput]:
        """Sample each sequence's next token from `logits` (the forward's logits rows), start or extend
        the new sequences and advance the running ones. Outputs in row order; none for a chunk that
        does not end its prompt."""
        sample_rows, sampled_ids, row = [], [], 0
        prompt_lps: dict[int, list[float]] = {}
        for r in rows.new:
            s = self._extend(r)
            num_rows = len(r.token_ids) if r.prompt_logprobs else int(not r.more_chunks)
            if r.prompt_logprobs:
                self._add_prompt_logprobs(s, r, logits[row : row + num_rows])
            row += num_rows
            if r.more_chunks:
                continue
            s.sampling = SequenceSamplingState(r.params, s.prompt_ids)
            s.sampling.skip_draws(r.num_generated)  # a recompute: its generator resumes
            s.prompt_ids = []
            if r.prompt_logprobs:
                prompt_lps[r.request_id], s.prompt_lps = s.prompt_lps, []
            sample_rows.append(row - 1)
            sampled_ids.append(r.request_id)
        sample_rows += range(row, logits.shape[0])
        if len(sample_rows) < logits.shape[0]:  # prompt-logprob rows are not sampled
            logits = logits[sample_rows]
        outputs = self._sample(logits, sampled_ids + rows.running_ids) if sample_rows else []
        for out in outputs:
            out.prompt_logprobs = prompt_lps.get(out.request_id)
        for s in rows.running:
            s.num_cached += 1
        return outputs

    def _extend(self, r: PrefillRequest) -> SequenceState:
        """Start the sequence of a whole prompt or first chunk; extend it with a later chunk."""
        if r.num_cached:
            s = self.sequences[r.request_id]
            s.block_table = list(r.block_table)
        else:
            s = SequenceState(
                block_table=list(r.block_table),
                lora_slot=r.lora_slot,
                adapter_generation=r.adapter_generation,
                params=r.params,
                sampling=None,
                num_cached=0,
                last_token=-1,
            )
            self.sequences[r.request_id] = s
        s.prompt_ids += r.token_ids
        s.num_cached += len(r.token_ids)
        return s

    def _add_prompt_logprobs(self, s: SequenceState, r: PrefillRequest, chunk_logits: torch.Tensor) -> None:
        """Add the logprobs of this chunk's tokens (after the first of the prompt) to `s.prompt_lps`:
        its rows [len(token_ids), vocab] predict its next tokens, the previous chunk's last row its
        first one; its own last row waits for the next chunk."""
        pending = s.pending_logits
        predicting = chunk_logits if pending is None else torch.cat([pending, chunk_logits])
        targets = r.token_ids if pending is not None else r.token_ids[1:]
        s.prompt_lps += prompt_logprobs(predicting[:-1], self._long(targets)).tolist()
        s.pending_logits = predicting[-1:] if r.more_chunks else None

    # ---- helpers --------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, ids: list[int]) -> list[TokenOutput]:
        seqs = [self.sequences[rid] for rid in ids]
        out = self.sampler(logits, [s.params for s in seqs], [s.sampling for s in seqs])
        token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
        top_ids, top_lps = out.top_token_ids.tolist(), out.top_logprobs.tolist()
        results = []
        for i, (rid, s) in enumerate(zip(ids, seqs, strict=True)):
            s.last_token = token_ids[i]  # the sampler has already counted it in s.sampling
            # Rows whose distribution has fewer than top_n live tokens (top_k < top_n) come padded with -1.
            top = [
                (t, lp)
                for t, lp in zip(top_ids[i][: s.params.top_n_tokens], top_lps[i], strict=False)
                if t >= 0
            ]
            results.append(
                TokenOutput(rid, token_ids[i], logprobs[i], [t for t, _ in top], [lp for _, lp in top])
            )
        return results

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @staticmethod
    def _in_request_order(outputs: list[TokenOutput], request_ids: list[int]) -> list[TokenOutput]:
        by_id = {o.request_id: o for o in outputs}
        return [by_id[rid] for rid in request_ids if rid in by_id]
