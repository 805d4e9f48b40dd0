"""TP=N equals TP=1 on the mixed-adapter scenario, with N ranks in N processes over gloo.

Covers world sizes that split vocab and MLP unevenly (tiny config: vocab 251, MLP 150 at N=2, 4), N=3
on a config with 6 heads and 3 KV heads, and more ranks than KV heads (each KV head replicated).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.adapter_factory import save_random_adapter, save_random_model, tiny_llama_config
from tests.worker.engine_scenario import TINY_LENGTHS, TINY_MIX, build_runner, run_scenario, scenario_prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, ws, port, model_dir, adapters, prompts, queue, join_step=False):
    from worker.parallel import init_parallel

    torch.set_num_threads(1)
    ctx = init_parallel(rank, ws, "127.0.0.1", port, torch.device("cpu"))
    try:
        runner, slots = build_runner(model_dir, adapters, ctx=ctx, rank=rank, ws=ws)
        records = run_scenario(runner, slots, prompts, join_step)
        if rank == 0:
            # Plain lists: tensors would be shared by file descriptor and vanish when this process exits.
            queue.put({rid: (r.tokens, torch.stack(r.logprobs).tolist()) for rid, r in records.items()})
        # Leave together: a rank that tears gloo down while its peer is still connected can abort the peer.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def run_tp(ws, model_dir, adapters, prompts, join_step=False):
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    port = _free_port()
    procs = [
        spawn.Process(target=_rank_main, args=(r, ws, port, model_dir, adapters, prompts, queue, join_step))
        for r in range(ws)
    ]
    for p in procs:
        p.start()
    try:
        # Read before joining: rank 0 blocks in put() until the parent drains the pipe.
        result = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {rid: (tokens, torch.tensor(lps)) for rid, (tokens, lps) in result.items()}


def assert_same(tp_records, single):
    for rid, rec in single.items():
        tokens, logprobs = tp_records[rid]
        assert tokens == rec.tokens, f"request {rid} ({rec.adapter}): tokens differ under TP"
        diff = (logprobs - torch.stack(rec.logprobs)).abs().max().item()
        assert diff <= 1e-4, f"request {rid} ({rec.adapter}): max |logprob diff| {diff:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "ws, join_step", [(2, False), (4, False), (2, True)], ids=["tp2", "tp4", "tp2-join-step"]
)
def test_tp_equals_single_rank(ws, join_step, tiny_model_dir, tiny_adapters):
    runner, slots = build_runner(tiny_model_dir, tiny_adapters)
    prompts = scenario_prompts(runner.hf_config.vocab_size, TINY_MIX, TINY_LENGTHS)
    single = run_scenario(runner, slots, prompts, join_step)
    assert_same(run_tp(ws, tiny_model_dir, tiny_adapters, prompts, join_step), single)


@pytest.mark.slow
def test_tp3_heads_divisible_by_three(tmp_path):
    config = tiny_llama_config(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=100
    )
    model_dir = save_random_model(config, tmp_path / "m", seed=3)
    adapters = {
        "r8_all": save_random_adapter(model_dir, tmp_path / "a", r=8, alpha=16, seed=4),
        "r4_qv": save_random_adapter(
            model_dir, tmp_path / "b", r=4, alpha=4, target_modules=("q_proj", "v_proj")
        ),
    }
    runner, slots = build_runner(model_dir, adapters)
    mix = [None, "r4_qv", "r8_all", "r8_all", "r4_qv", None]
    prompts = scenario_prompts(config.vocab_size, mix, [4, 7, 2, 9, 3, 5])
    single = run_scenario(runner, slots, prompts)
    assert_same(run_tp(3, model_dir, adapters, prompts), single)


@pytest.mark.slow
@pytest.mark.parametrize("num_kv_heads, ws", [(2, 4), (1, 2)], ids=["kv2-tp4", "mqa-tp2"])
def test_tp_past_the_kv_heads_replicates_them(num_kv_heads, ws, tmp_path):
    config = tiny_llama_config(num_key_value_heads=num_kv_heads)
    model_dir = save_random_model(config, tmp_path / "m", seed=5)
    adapters = {
        "r8_all": save_random_adapter(model_dir, tmp_path / "a", r=8, alpha=16, seed=6),
        "r4_kv": save_random_adapter(
            model_dir, tmp_path / "b", r=4, alpha=8, target_modules=("k_proj", "v_proj"), seed=7
        ),
    }
    runner, slots = build_runner(model_dir, adapters)
    mix = [None, "r4_kv", "r8_all", "r4_kv", "r8_all"]
    prompts = scenario_prompts(config.vocab_size, mix, [5, 8, 3, 6, 4])
    single = run_scenario(runner, slots, prompts)
    assert_same(run_tp(ws, model_dir, adapters, prompts), single)


@pytest.mark.parametrize(
    "num_kv_heads, ws, layout",
    [
        (8, 4, [(0, 2), (2, 2), (4, 2), (6, 2)]),  # split evenly
        (8, 16, [(r // 2, 1) for r in range(16)]),  # Llama-3-70B on 16 ranks: each head on 2
        (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]),
        (1, 4, [(0, 1)] * 4),  # multi-query: every rank holds the one head
    ],
)
def test_kv_head_layout(num_kv_heads, ws, layout):
    from worker.parallel import kv_head_shard

    assert [kv_head_shard(num_kv_heads, r, ws) for r in range(ws)] == layout


def test_each_rank_holds_the_kv_heads_its_query_heads_read():
    from worker.parallel import check_head_split, kv_head_shard, shard_range

    for num_heads, num_kv_heads, ws in [(64, 8, 16), (32, 8, 8), (8, 2, 4), (8, 1, 8), (6, 3, 3), (12, 4, 2)]:
        check_head_split(num_heads, num_kv_heads, ws)
        group = num_heads // num_kv_heads
        for rank in range(ws):
            start, count = shard_range(num_heads, rank, ws)
            first, kv_count = kv_head_shard(num_kv_heads, rank, ws)
            assert {h // group for h in range(start, start + count)} <= set(range(first, first + kv_count))


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, ws, message",
    [
        (8, 4, 3, "8 attention heads do not divide across 3"),
        (12, 6, 4, "6 key/value heads do not divide across 4"),
        (24, 4, 6, "6 tensor-parallel ranks are not a multiple of the 4 key/value heads"),
    ],
)
def test_head_layouts_that_cannot_be_are_refused(num_heads, num_kv_heads, ws, message):
    from worker.parallel import check_head_split

    with pytest.raises(ValueError, match=message):
        check_head_split(num_heads, num_kv_heads, ws)


def test_heads_not_divisible_is_refused(tiny_model_dir):
    from worker.layers.linear import QKVParallelLinear
    from worker.parallel import ParallelContext

    with pytest.raises(ValueError, match="8 attention heads do not divide across 3"):
        QKVParallelLinear(64, 8, 8, 4, False, ParallelContext(rank=0, world_size=3), torch.float32, "cpu")
