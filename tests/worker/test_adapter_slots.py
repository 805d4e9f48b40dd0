"""Adapter slots on the runner: a reused slot serves only its new adapter, generations guard every row,
a load reports the bytes it takes on its rank, and the pool's budget refuses what does not fit."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.adapter_factory import save_random_adapter
from tests.worker.engine_scenario import BLOCK_SIZE, build_runner
from worker.config import WorkerConfig
from worker.lora.adapter import load_peft_adapter
from worker.parallel import ParallelContext
from worker.runner import ModelRunner, PrefillRequest, RequestError
from worker.sampler import SamplingParams

# A batch over three slots (two rows each, so that the CPU's grouped LoRA path runs: it caches weight
# copies across steps, which a reload into a slot must not leave stale).
BATCH_SLOTS = [1, 2, 3, 1, 2, 3]


def _load(runner: ModelRunner, slot: int, name: str, path, generation: int) -> None:
    adapter = load_peft_adapter(name, path, runner.hf_config.num_hidden_layers, runner.module_shapes())
    runner.load_adapter(slot, adapter, generation)


def _run_batch(runner: ModelRunner, generations: dict[int, int], first_id: int) -> list[tuple]:
    """Prefill BATCH_SLOTS' rows, decode them 3 times, release them; (token, full logprobs) per output."""
    vocab = runner.hf_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    requests = [
        PrefillRequest(
            first_id + i,
            torch.randint(3, vocab, (3 + i,), generator=gen).tolist(),
            [3 * i, 3 * i + 1, 3 * i + 2],
            SamplingParams(top_n_tokens=vocab),
            slot,
            adapter_generation=generations[slot],
        )
        for i, slot in enumerate(BATCH_SLOTS)
    ]
    ids = [r.request_id for r in requests]
    outputs = runner.prefill(requests)
    for _ in range(3):
        outputs += runner.decode(ids)
    runner.release(ids)

    def full(o):
        dist = torch.full((vocab,), -float("inf"))
        dist[torch.tensor(o.top_token_ids)] = torch.tensor(o.top_logprobs)
        return o.token_id, dist

    return [full(o) for o in outputs]


def test_a_reused_slot_serves_only_its_new_adapter(tiny_model_dir, tiny_adapters, tmp_path):
    """X (rank 16, all modules) in slot 1, served, unloaded; then Y (rank 4, q/v only) in slot 1: the
    outputs are those of a runner that only ever held Y there (no row of X survives, none is read)."""
    x_dir = save_random_adapter(tiny_model_dir, tmp_path / "x", r=16, alpha=32, seed=9)
    others = {"r8_all": tiny_adapters["r8_all"], "r16_mlp": tiny_adapters["r16_mlp"]}
    reused, _ = build_runner(tiny_model_dir, {}, num_slots=3)
    fresh, _ = build_runner(tiny_model_dir, {}, num_slots=3)
    for runner in (reused, fresh):
        for slot, (name, path) in enumerate(others.items(), start=2):
            _load(runner, slot, name, path, generation=slot)

    _load(reused, 1, "x", x_dir, generation=11)
    _run_batch(reused, {1: 11, 2: 2, 3: 3}, first_id=100)
    assert reused.unload_adapter(1, 11)[0].name == "x"
    _load(reused, 1, "r4_qv", tiny_adapters["r4_qv"], generation=12)
    got = _run_batch(reused, {1: 12, 2: 2, 3: 3}, first_id=200)

    _load(fresh, 1, "r4_qv", tiny_adapters["r4_qv"], generation=12)
    want = _run_batch(fresh, {1: 12, 2: 2, 3: 3}, first_id=200)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=0)


def test_a_running_row_whose_slot_changed_fails_the_step(tiny_model_dir, tiny_adapters):
    """The decode check: should a running sequence's slot be emptied or reloaded (the runner refuses to
    unload a slot in use, so here the check of users is skipped), the step fails, nothing changes."""
    runner, _ = build_runner(tiny_model_dir, {"r4_qv": tiny_adapters["r4_qv"]})
    runner.prefill([PrefillRequest(1, [3, 4], [0, 1], lora_slot=1, adapter_generation=1001)])
    runner.slots.unload(1, 1001, users=[])
    with pytest.raises(RequestError) as info:
        runner.decode([1])
    assert str(info.value) == (
        "request 1: prefilled with generation 1001 of slot 1, but the slot now holds no adapter; refusing "
        "to run it with other weights"
    )
    _load(runner, 1, "r8_all", tiny_adapters["r8_all"], generation=1002)
    with pytest.raises(RequestError, match="now holds adapter 'r8_all' generation 1002; refusing"):
        runner.step([PrefillRequest(2, [5], [2], lora_slot=1, adapter_generation=1002)], [1])
    assert list(runner.sequences) == [1] and runner.sequences[1].num_cached == 2


def test_runner_load_refusals(tiny_model_dir, tiny_adapters):
    runner, _ = build_runner(tiny_model_dir, {"r4_qv": tiny_adapters["r4_qv"]}, num_slots=2)
    with pytest.raises(RequestError, match="adapter 'r8_all': generation 0 is not a load generation"):
        _load(runner, 2, "r8_all", tiny_adapters["r8_all"], generation=0)
    with pytest.raises(RequestError, match=r"slot 1 already holds adapter 'r4_qv' \(generation 1001\)"):
        _load(runner, 1, "r8_all", tiny_adapters["r8_all"], generation=5)
    with pytest.raises(RequestError, match="adapter 'r8_all': slot 3 is not an adapter slot"):
        _load(runner, 3, "r8_all", tiny_adapters["r8_all"], generation=5)
    assert 2 not in runner.adapters and runner.adapters[1].generation == 1001


@pytest.mark.parametrize("rank", [0, 1])
def test_weight_bytes_are_this_ranks_share(rank, tiny_model_dir, tiny_adapters):
    """Column-parallel modules (q/k/v/gate/up) keep A whole and half of B's rows; row-parallel ones
    (o/down) half of A's columns and B whole; a float32 pool on the CPU (4 bytes)."""
    runner = _runner(tiny_model_dir, max_adapters=1, rank=rank, world_size=2)
    adapter = load_peft_adapter("r8_all", tiny_adapters["r8_all"], 3, runner.module_shapes())
    elements = 0
    for module, shape in runner.module_shapes().items():
        if module in ("o_proj", "down_proj"):
            elements += 8 * shape.h_in // 2 + shape.h_out * 8
        else:
            elements += 8 * shape.h_in + shape.h_out // 2 * 8
    assert runner.load_adapter(1, adapter, generation=1).weight_bytes == 3 * elements * 4


def test_the_runner_keeps_no_copy_of_the_weights_outside_its_pool(tiny_model_dir, tiny_adapters):
    """Once placed, the adapter's host tensors (read, then converted) are freed: a slot holds the facts
    of its adapter, and the pool the weights."""
    runner, _ = build_runner(tiny_model_dir, {}, num_slots=1)
    adapter = load_peft_adapter("r8_all", tiny_adapters["r8_all"], 3, runner.module_shapes())
    refs = [weakref.ref(t) for w in adapter.weights.values() for t in (w.a, w.b)]
    prepared = runner.prepare_adapter(adapter)
    refs += [weakref.ref(block) for block in prepared.packed.blocks.values()]
    runner.place_adapter(1, 5, prepared)
    del adapter, prepared
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert runner.adapters[1].name == "r8_all"


def _runner(tiny_model_dir, **config) -> ModelRunner:
    """A float32 runner with 8 KV blocks and `config`'s other WorkerConfig fields."""
    c = WorkerConfig(model_dir=tiny_model_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=8, **config)
    return ModelRunner(c, ParallelContext(rank=c.rank, world_size=c.world_size))


def _pool_runner(tiny_model_dir, adapter_memory_bytes: int) -> ModelRunner:
    return _runner(tiny_model_dir, max_adapters=4, adapter_memory_bytes=adapter_memory_bytes)


def test_a_load_the_pool_cannot_hold_changes_nothing(tiny_model_dir, tiny_adapters):
    """The pool holds r8_all (all modules, rank 8) but not r8_all and r16_mlp together: the second load
    fails with AdapterMemoryError naming the adapter, nothing changes, and it fits once r8_all left."""
    from worker.lora.slots import AdapterMemoryError

    probe = _pool_runner(tiny_model_dir, 1 << 24)
    _load(probe, 1, "r8_all", tiny_adapters["r8_all"], generation=1)
    one_adapter = probe.slots.pool.bytes_used
    runner = _pool_runner(tiny_model_dir, one_adapter + one_adapter // 4)
    _load(runner, 1, "r8_all", tiny_adapters["r8_all"], generation=1)
    used, storage = runner.slots.pool.bytes_used, runner.slots.pool.storage.clone()
    with pytest.raises(AdapterMemoryError, match="adapter 'r16_mlp': adapter pool full"):
        _load(runner, 2, "r16_mlp", tiny_adapters["r16_mlp"], generation=2)
    assert list(runner.adapters) == [1] and runner.slots.pool.bytes_used == used
    assert torch.equal(runner.slots.pool.storage.isnan(), storage.isnan())
    runner.unload_adapter(1, 1)
    pool = runner.slots.pool
    assert pool.bytes_used == 0 and pool.filled_storage().isnan().all()
    _load(runner, 2, "r16_mlp", tiny_adapters["r16_mlp"], generation=2)
    assert list(runner.adapters) == [2]


def test_an_unload_can_keep_the_weights_for_the_host_tier(tiny_model_dir, tiny_adapters):
    """`keep`: the weights read back from the pool are the prepared ones, and placing them again gives
    the same rows' contents."""
    runner = _pool_runner(tiny_model_dir, 1 << 24)
    adapter = load_peft_adapter("r8_all", tiny_adapters["r8_all"], 3, runner.module_shapes())
    prepared = runner.prepare_adapter(adapter)
    want = {k: (f.a.clone(), f.b_t.clone()) for k, f in prepared.factors.items()}
    runner.place_adapter(1, 1, prepared)
    held, kept = runner.unload_adapter(1, 1, keep=True)
    assert held.name == "r8_all" and kept.facts.weight_bytes == held.weight_bytes
    assert set(kept.factors) == set(want)
    for key, (a, b_t) in want.items():
        assert torch.equal(kept.factors[key].a, a) and torch.equal(kept.factors[key].b_t, b_t)
    assert runner.place_adapter(1, 2, kept).generation == 2
