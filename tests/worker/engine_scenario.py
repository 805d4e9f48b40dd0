"""A scripted multi-adapter scenario for the engine, shared by the peft-equality and TP tests.

Sequences of different lengths and adapters are prefilled together, decoded, one leaves, two join (one
reusing the blocks of the one that left; in a prefill of their own or in a join step with the others'
decode), and decoding goes on. Every step records the chosen token and
the full log-softmax distribution (top_n = vocab), so callers can compare with any reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.config import WorkerConfig
from worker.lora.adapter import load_peft_adapter
from worker.parallel import ParallelContext
from worker.runner import ModelRunner, PrefillRequest
from worker.sampler import SamplingParams

BLOCK_SIZE = 4
# Tokens a sequence may generate here, at most; its blocks are allocated for them at its prefill, as the
# router allocates prompt + max_new_tokens.
MAX_NEW_TOKENS = 8
# The mix over the tiny model's session adapters (tests/conftest.py `tiny_adapters`) and prompt lengths.
TINY_MIX = [None, "r4_qv", "r8_all", "r16_mlp", "r64_rs", "r8_layer1", "r8_all", "r4_qv"]
TINY_LENGTHS = [5, 9, 3, 12, 7, 1, 6, 4]


def generation_of(slot: int) -> int:
    """The load generation these tests give the adapter in `slot` (0 for slot 0, "no adapter"): unlike
    the slot's number, so that a mix-up of the two fails."""
    return 0 if slot == 0 else 1000 + slot


@dataclass
class Record:
    adapter: str | None
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # each [vocab]


def build_runner(
    model_dir: Path,
    adapters: dict[str, Path],
    dtype="float32",
    device="cpu",
    ctx=None,
    rank=0,
    ws=1,
    num_slots: int | None = None,
):
    """A runner with `adapters` loaded into slots 1, 2, ... of its `num_slots` (default: one each), each
    as load generation `generation_of(slot)`."""
    config = WorkerConfig(
        model_dir=model_dir,
        dtype=dtype,
        device=device,
        block_size=BLOCK_SIZE,
        num_blocks=96,
        max_adapters=len(adapters) if num_slots is None else num_slots,
        max_lora_rank=64,
        rank=rank,
        world_size=ws,
    )
    runner = ModelRunner(config, ctx or ParallelContext())
    slots = {}
    for slot, (name, path) in enumerate(adapters.items(), start=1):
        adapter = load_peft_adapter(name, path, runner.hf_config.num_hidden_layers, runner.module_shapes())
        runner.load_adapter(slot, adapter, generation_of(slot))
        slots[name] = slot
    return runner, slots


class _Blocks:
    """The smallest block bookkeeping a caller needs: a free list and one table per sequence."""

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    def allocate(self, rid: int, num_tokens: int) -> list[int]:
        num_blocks = -(-num_tokens // BLOCK_SIZE)
        self.tables[rid], self.free = self.free[:num_blocks], self.free[num_blocks:]
        return self.tables[rid]

    def release(self, rid: int) -> None:
        self.free[:0] = self.tables.pop(rid)  # reused first, so stale cache contents would show


def run_scenario(
    runner: ModelRunner,
    slots: dict[str, int],
    prompts: dict[int, tuple[str | None, list[int]]],
    join_step: bool = False,
):
    """prompts: request id -> (adapter name or None, prompt). Ids 0..n-3 start together; the last two join,
    in a prefill of their own, or with `join_step` in the same forward as the others' next decode."""
    vocab = runner.hf_config.vocab_size
    params = SamplingParams(top_n_tokens=vocab)
    records = {rid: Record(a, p) for rid, (a, p) in prompts.items()}
    blocks = _Blocks(runner.kv.num_blocks)
    ids = list(prompts)
    first, joiners, leaver = ids[:-2], ids[-2:], ids[2]

    def record(outputs):
        for o in outputs:
            dist = torch.full((vocab,), -math.inf)
            dist[torch.tensor(o.top_token_ids)] = torch.tensor(o.top_logprobs)
            records[o.request_id].tokens.append(o.token_id)
            records[o.request_id].logprobs.append(dist)

    def new_requests(rids):
        reqs = []
        for rid in rids:
            adapter, prompt = prompts[rid]
            table = blocks.allocate(rid, len(prompt) + MAX_NEW_TOKENS)
            slot = slots[adapter] if adapter else 0
            reqs.append(
                PrefillRequest(rid, prompt, table, params, slot, adapter_generation=generation_of(slot))
            )
        return reqs

    def prefill(rids):
        record(runner.prefill(new_requests(rids)))

    def decode(rids, joining=()):
        record(runner.step(new_requests(joining), rids))

    running = list(first)
    prefill(first)
    for _ in range(2):
        decode(running)
    running.remove(leaver)
    runner.release([leaver])
    blocks.release(leaver)
    if join_step:
        decode(running, joining=joiners)
        running += joiners
    else:
        prefill(joiners)
        running += joiners
        decode(running)
    for _ in range(2):
        decode(running)
    return records


def scenario_prompts(vocab: int, adapters: list[str | None], lengths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {
        rid: (adapter, torch.randint(3, vocab, (n,), generator=gen).tolist())
        for rid, (adapter, n) in enumerate(zip(adapters, lengths, strict=True))
    }
