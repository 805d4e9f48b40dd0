"""Continuous batching against the fake workers: mixing adapters, budgets, waiting for blocks, disconnects."""

from __future__ import annotations

import asyncio

from tests.router.conftest import SCRIPTS


def _new_sequences(fake) -> list:
    """Every NewSequence the fake was sent: in Prefill calls and joining Decode calls, in call order."""
    return [
        s
        for m, r in fake.calls
        if m in ("Prefill", "Decode")
        for s in (r.sequences if m == "Prefill" else r.joining)
    ]


def _slots_by_request(fake) -> dict[int, int]:
    return {s.request_id: s.lora_slot for s in _new_sequences(fake)}


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


async def test_different_adapters_share_decode_steps(start_router):
    h = await start_router(world_size=2)
    for f in h.fakes:
        f.step_delay = 0.02
    adapters = [None, "org/adapter-one", "adapter-two"]
    resps = await asyncio.gather(*(h.generate("Hi", max_new_tokens=8, adapter_id=a) for a in adapters))
    texts = [(await r.json())["generated_text"] for r in resps]
    assert texts == [SCRIPTS[0][:8], SCRIPTS[1][:8], SCRIPTS[2][:8]]
    slots = _slots_by_request(h.fakes[0])
    mixed = [
        r.request_ids for r in h.fakes[0].requests("Decode") if len({slots[i] for i in r.request_ids}) == 3
    ]
    assert mixed, "no decode step ran the three adapters together"
    # Both ranks saw exactly the same steps.
    assert [list(r.request_ids) for r in h.fakes[1].requests("Decode")] == [
        list(r.request_ids) for r in h.fakes[0].requests("Decode")
    ]
    await h.settle()


async def test_newcomers_join_a_running_batch(start_router):
    h = await start_router(world_size=1)
    h.fakes[0].step_delay = 0.01
    first = asyncio.create_task(h.generate("Hi", max_new_tokens=20))
    await _wait_for(lambda: len(h.fakes[0].requests("Decode")) >= 3)
    second = await h.generate("Hi", max_new_tokens=3, adapter_id="adapter-two")
    assert (await second.json())["generated_text"] == SCRIPTS[2][:3]
    assert not first.done()  # the second one ran inside the first one's batch
    assert (await (await first).json())["generated_text"] == SCRIPTS[0][:20]
    decode_sizes = [len(r.request_ids) for r in h.fakes[0].requests("Decode")]
    assert max(decode_sizes) == 2
    # It joined in a join step: its prompt rode in a Decode call with the running request, no Prefill.
    assert len(h.fakes[0].requests("Prefill")) == 1
    joins = [r for r in h.fakes[0].requests("Decode") if r.joining]
    assert len(joins) == 1 and len(joins[0].request_ids) == 1 and joins[0].joining[0].lora_slot != 0


async def test_a_failed_join_step_is_redone_apart(start_router):
    h = await start_router(world_size=2)
    for f in h.fakes:
        f.step_delay = 0.01
    first = asyncio.create_task(h.generate("Hi", max_new_tokens=20))
    await _wait_for(lambda: len(h.fakes[0].requests("Decode")) >= 3)
    for f in h.fakes:
        # The join step fails on both ranks; keyed on the joiners, since the plain decode steps in flight
        # while this is set must not be the ones that fail.
        f.fail_next_join = "device fell over"
    second = await h.generate("Hi", max_new_tokens=3, adapter_id="adapter-two")
    # The join step was redone apart (Prefill, then Decode), so both requests still complete in full.
    assert (await second.json())["generated_text"] == SCRIPTS[2][:3]
    assert (await (await first).json())["generated_text"] == SCRIPTS[0][:20]
    methods = [
        (m, bool(m == "Decode" and r.joining)) for m, r in h.fakes[0].calls if m in ("Prefill", "Decode")
    ]
    join = methods.index(("Decode", True))
    assert methods[join + 1 : join + 3] == [("Prefill", False), ("Decode", False)]
    await h.settle()


async def test_queued_requests_share_the_blocks_then_all_finish(start_router):
    # 8 blocks of 4 tokens; each request would need 3 + 20 = 23 tokens = 6 blocks at its longest, but
    # blocks come on demand: all three start at once, and preemption sorts out the rest (test_preemption).
    h = await start_router(world_size=1, fake={"num_blocks": 8, "block_size": 4})
    h.fakes[0].step_delay = 0.002
    resps = await asyncio.gather(*(h.generate("Hi", max_new_tokens=20, details=True) for _ in range(3)))
    for r in resps:
        body = await r.json()
        assert r.status == 200 and body["details"]["generated_tokens"] == 20
        assert body["generated_text"] == SCRIPTS[0][:20]
    await h.settle()
    assert max(len(r.request_ids) for r in h.fakes[0].requests("Decode")) >= 2


async def test_max_batch_size_and_prefill_budget(start_router):
    h = await start_router(world_size=1, max_batch_size=2, max_batch_prefill_tokens=12)
    h.fakes[0].step_delay = 0.005
    resps = await asyncio.gather(*(h.generate("Hello", max_new_tokens=4) for _ in range(5)))
    assert all(r.status == 200 for r in resps)
    fake = h.fakes[0]
    assert all(len(r.request_ids) <= 2 for r in fake.requests("Decode"))
    assert all(sum(len(s.token_ids) for s in r.sequences) <= 12 for r in fake.requests("Prefill"))
    assert sum(len(r.sequences) for r in fake.requests("Prefill")) == 5


async def test_disconnected_client_frees_its_blocks(start_router):
    h = await start_router(world_size=2)
    for f in h.fakes:
        f.step_delay = 0.01
    sched = h.state.scheduler
    task = asyncio.create_task(h.generate("Hi", max_new_tokens=200))
    await _wait_for(lambda: len(h.fakes[0].requests("Decode")) >= 2)
    assert sched.blocks.num_free < sched.blocks.num_blocks
    (seq,) = sched.running
    task.cancel()  # the client goes away mid-generation
    await h.settle()
    assert sched.blocks.num_free == sched.blocks.num_blocks
    for f in h.fakes:
        assert [list(r.request_ids) for r in f.requests("Release")] == [[seq.id]]
        assert f.sequences == {}
    assert len(h.fakes[0].requests("Decode")) < 50
    # The server keeps serving.
    assert (await h.generate("Hi", max_new_tokens=2)).status == 200


async def test_disconnect_while_queued_never_runs(start_router):
    h = await start_router(world_size=1, max_batch_size=1)
    h.fakes[0].step_delay = 0.01
    first = asyncio.create_task(h.generate("Hi", max_new_tokens=10))
    await _wait_for(lambda: len(h.fakes[0].requests("Decode")) >= 1)
    queued = asyncio.create_task(h.generate("Hi", max_new_tokens=10, adapter_id="adapter-two"))
    await _wait_for(lambda: len(h.state.scheduler.queue) == 1)
    queued.cancel()
    await _wait_for(lambda: len(h.state.scheduler.queue) == 0)
    assert (await first).status == 200
    await h.settle()
    assert [s.lora_slot for r in h.fakes[0].requests("Prefill") for s in r.sequences] == [0]


async def test_waiting_served_ratio_delays_joining_until_max_waiting_tokens(start_router):
    # Two running and a ratio of 1.0: one newcomer is not worth pausing the batch for, until 5 decode
    # steps have passed since the last prefill.
    h = await start_router(world_size=1, waiting_served_ratio=1.0, max_waiting_tokens=5)
    fake = h.fakes[0]
    fake.step_delay = 0.005
    running = [asyncio.create_task(h.generate("Hi", max_new_tokens=60)) for _ in range(2)]
    await _wait_for(lambda: len(h.state.scheduler.running) == 2)
    newcomer = await h.generate("Hi", max_new_tokens=2)
    assert newcomer.status == 200
    # A join step (a Decode call with joining sequences) is a prefill here.
    methods = [
        "Prefill" if m == "Prefill" or r.joining else "Decode"
        for m, r in fake.calls
        if m in ("Prefill", "Decode")
    ]
    last = len(methods) - 1 - methods[::-1].index("Prefill")  # the newcomer's prefill
    previous = last - 1 - methods[:last][::-1].index("Prefill")
    assert methods[previous + 1 : last].count("Decode") >= 5
    for t in running:
        t.cancel()
