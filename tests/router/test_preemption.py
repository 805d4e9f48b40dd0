"""KV blocks on demand with preemption, against the fake workers: blocks grow with the sequence, the
newest-admitted is preempted when the pool runs out and re-queued at the front, its recompute resumes its
script, streams neither repeat nor skip a token, and no block is ever lost or handed out twice."""

from __future__ import annotations

import asyncio

import pytest

from proto import generate_pb2 as pb
from router.block_manager import BlockManager
from router.queue import RequestQueue
from router.sequence import Sequence, SequenceParams
from router.tokenizer import ModelTokenizer
from tests.router.conftest import SCRIPTS
from tests.router.test_metrics import scrape, value
from tests.router.test_stream import events

# 8 blocks of 4 tokens: three prompts of 3 tokens run together until each holds 9 tokens (8 + 1 block).
SMALL_POOL = {"num_blocks": 8, "block_size": 4}


def _new_sequences(fake) -> list:
    """Every NewSequence the fake was sent (Prefill calls and joining Decode calls), in call order."""
    return [
        s
        for m, r in fake.calls
        if m in ("Prefill", "Decode")
        for s in (r.sequences if m == "Prefill" else r.joining)
    ]


def _recomputes(fake) -> list:
    return [s for s in _new_sequences(fake) if s.num_generated]


def _first_preempted(fake) -> list[int]:
    """The request ids of the first Release that was a preemption (one recomputed later)."""
    recomputed = {s.request_id for s in _recomputes(fake)}
    return next(list(r.request_ids) for r in fake.requests("Release") if set(r.request_ids) & recomputed)


async def _watch_blocks(sched, stop: asyncio.Event, seen: list[int]) -> None:
    """Check, every few ms, that the pool never hands out more than it has and that the running
    sequences hold only blocks it handed out, none of them twice."""
    while not stop.is_set():
        free, total = sched.blocks.num_free, sched.blocks.num_blocks
        held = [b for s in sched.running for b in s.blocks]
        assert 0 <= free <= total
        assert len(held) == len(set(held)) <= total - free
        seen.append(len(held))
        await asyncio.sleep(0.001)


async def test_blocks_grow_and_the_newest_admitted_is_preempted_then_recomputed(start_router):
    h = await start_router(world_size=2, fake=SMALL_POOL)
    for f in h.fakes:
        f.step_delay = 0.002
    sched, stop, seen = h.state.scheduler, asyncio.Event(), []
    watcher = asyncio.create_task(_watch_blocks(sched, stop, seen))
    resps = await asyncio.gather(*(h.generate("Hi", max_new_tokens=20, details=True) for _ in range(3)))
    bodies = [await r.json() for r in resps]
    stop.set()
    await watcher
    assert all(b["generated_text"] == SCRIPTS[0][:20] for b in bodies)  # as if never interrupted
    assert all(b["details"]["generated_tokens"] == 20 for b in bodies)
    fake = h.fakes[0]
    first = _new_sequences(fake)[:3]
    assert [len(s.block_table) for s in first] == [1, 1, 1]  # the prompt's blocks only, not 6 each
    assert any(r.grown for r in fake.requests("Decode"))
    # The newest admitted went first; its recompute carried its prompt plus what it had generated.
    newest = max(s.request_id for s in first)
    assert _first_preempted(fake) == [newest]
    again = next(s for s in _recomputes(fake) if s.request_id == newest)
    assert list(again.token_ids[: -again.num_generated]) == list(first[0].token_ids)
    assert len(again.block_table) * 4 >= len(again.token_ids)
    _, m = await scrape(h)
    assert value(m, "multilora_preemptions", adapter="tiny-base") == len(_recomputes(fake)) >= 2
    assert max(seen) <= 8
    await h.settle()
    for f in h.fakes:  # both ranks saw the same steps
        assert [r.grown for r in f.requests("Decode")] == [r.grown for r in fake.requests("Decode")]


async def test_a_preempted_request_goes_back_in_front_of_later_ones(start_router):
    h = await start_router(world_size=1, fake=SMALL_POOL)
    h.fakes[0].step_delay = 0.003
    sched = h.state.scheduler
    first = [asyncio.create_task(h.generate("Hi", max_new_tokens=20)) for _ in range(3)]
    async with asyncio.timeout(5):
        while not any(s.preemptions for s in sched.queue):
            await asyncio.sleep(0.001)
    (preempted,) = [s for s in sched.queue if s.preemptions]
    # A later request of an adapter that was never served: fairness alone would rank it first.
    late = await h.generate("Hi", max_new_tokens=2, adapter_id="adapter-two")
    assert (await late.json())["generated_text"] == SCRIPTS[2][:2]
    assert all(r.status == 200 for r in await asyncio.gather(*first))
    order = [s.request_id for s in _new_sequences(h.fakes[0])]
    late_id = max(order)
    assert order.index(late_id) > order.index(preempted.id, order.index(preempted.id) + 1)


async def test_a_stream_through_a_preemption_neither_repeats_nor_skips(start_router):
    h = await start_router(world_size=1, fake=SMALL_POOL)
    h.fakes[0].step_delay = 0.002
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 20}}
    raws = await asyncio.gather(
        *(h.http.post("/generate_stream", json=body) for _ in range(3)), return_exceptions=False
    )
    streams = [events(await r.read()) for r in raws]
    assert _recomputes(h.fakes[0]), "nothing was preempted"
    for evs in streams:
        assert [e["index"] for e in evs] == list(range(1, 21))
        assert "".join(e["token"]["text"] for e in evs) == SCRIPTS[0][:20]
        assert evs[-1]["generated_text"] == SCRIPTS[0][:20]


async def test_a_request_without_max_new_tokens_reserves_no_whole_context(start_router):
    # 64 blocks of 4: max_total_tokens is 256, the whole cache. Reserved up front, one such request
    # would take every block; on demand, two run side by side holding a block or so each.
    h = await start_router(world_size=1)
    h.fakes[0].step_delay = 0.005
    sched = h.state.scheduler
    resps = [asyncio.create_task(h.generate("Hi")) for _ in range(2)]
    async with asyncio.timeout(5):
        while len(sched.running) < 2:
            await asyncio.sleep(0.001)
    assert sum(len(s.blocks) for s in sched.running) <= 4
    assert all(r.status == 200 for r in await asyncio.gather(*resps))
    assert max(len(r.request_ids) for r in h.fakes[0].requests("Decode")) == 2


async def test_max_batch_total_tokens_bounds_what_the_batch_holds(start_router):
    # The cache has 64 blocks, but the batch may hold 24 tokens = 6 blocks: past that, preemption.
    h = await start_router(world_size=1, max_batch_total_tokens=24)
    h.fakes[0].step_delay = 0.002
    sched, stop, seen = h.state.scheduler, asyncio.Event(), []
    watcher = asyncio.create_task(_watch_blocks(sched, stop, seen))
    resps = await asyncio.gather(*(h.generate("Hi", max_new_tokens=12) for _ in range(3)))
    stop.set()
    await watcher
    assert [(await r.json())["generated_text"] for r in resps] == [SCRIPTS[0][:12]] * 3
    assert max(seen) <= 6
    assert _recomputes(h.fakes[0])


def test_blocks_grow_in_place_and_come_back(tiny_tokenizer_dir):
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(3)
    assert (table, bm.missing(table, 4), bm.missing(table, 5)) == ([0], 0, 1)
    bm.grow(table, 9)
    assert table == [0, 1, 2] and bm.num_free == 1
    with pytest.raises(RuntimeError):
        bm.grow(table, 17)
    assert table == [0, 1, 2]  # a growth that cannot happen takes nothing
    bm.free(table)
    assert bm.num_free == 4


def test_a_recompute_longer_than_the_prefill_budget_goes_alone(tiny_tokenizer_dir):
    tokenizer = ModelTokenizer.from_model_dir(tiny_tokenizer_dir)
    params = SequenceParams(input_ids=(5,) * 6, max_new_tokens=20, sampling=pb.SamplingParameters())
    q = RequestQueue(BlockManager(num_blocks=100, block_size=4))
    preempted, fresh = Sequence(1, params, tokenizer), Sequence(2, params, tokenizer)
    for token in range(6):  # it had generated 6 tokens: its recompute prefills 12
        preempted.on_generation(pb.Generation(request_id=1, token_id=40 + token))
    q.push_front(preempted)
    q.append(fresh)
    budget = dict(min_size=0, max_size=None, prefill_budget=10, token_budget=1000)
    assert q.next_batch(**budget) == [preempted]  # alone, although 12 > 10
    assert len(preempted.blocks) == 3 and preempted.to_pb().num_generated == 6
    assert list(preempted.to_pb().token_ids) == [5] * 6 + list(range(40, 46))
    assert q.next_batch(**budget) == [fresh]
