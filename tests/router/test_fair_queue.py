"""Fair admission against the fake workers: VTC order and bound, the lift on return, weights, tenants, and
the per-adapter cap (429 naming the adapter).

The service each adapter got is counted here from what the fake worker was sent (a new sequence's prompt
tokens, one generated token per sequence per step), at the documented costs: 1 per prompt token, 2 per
generated token. Among adapters that all have requests waiting, VTC keeps that service within one
prompt plus the running batch's output of each other (`_bound`).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from proto import generate_pb2 as pb
from router.fairness import INPUT_TOKEN_COST, OUTPUT_TOKEN_COST
from router.sequence import EndEvent, ErrorEvent, Sequence, SequenceParams
from tests.router.conftest import ADAPTER_IDS, BASE_MODEL_ID

A, B = ADAPTER_IDS


def _bound(*, prompt: int, new: int, batch: int) -> float:
    """The most backlogged adapters may differ by: one prompt admitted, plus what a full running batch
    generates before a slot frees."""
    return INPUT_TOKEN_COST * prompt + OUTPUT_TOKEN_COST * batch * new


async def _submit(h, jobs: list[tuple[str | None, int, int]], tenant: str | None = None) -> list[Sequence]:
    """Submit `(adapter, prompt_len, max_new_tokens)` jobs in order, all before the scheduler runs again."""
    leases = {a: await h.state.adapters.acquire(a) for a in {a for a, _, _ in jobs}}
    seqs = []
    for adapter, prompt, new in jobs:
        lease = leases[adapter]
        params = SequenceParams(
            input_ids=(7,) * prompt,
            max_new_tokens=new,
            sampling=pb.SamplingParameters(),
            lora_slot=0 if lease is None else lease.slot,
            adapter_generation=0 if lease is None else lease.generation,
        )
        seqs.append(h.state.scheduler.submit(params, None if lease is None else lease.clone(), tenant))
    for lease in leases.values():
        if lease is not None:
            lease.release()
    return seqs


async def _ended(seqs: list[Sequence]) -> None:
    async def one(seq: Sequence) -> None:
        while True:
            event = await seq.events.get()
            assert not isinstance(event, ErrorEvent), event.error.message
            if isinstance(event, EndEvent):
                return

    async with asyncio.timeout(20):
        await asyncio.gather(*(one(s) for s in seqs))


def _service(calls: list, owner: dict[int, str]) -> list[tuple[Counter, Counter]]:
    """After each step of `owner`'s sequences in the fake's `calls`: (service so far, sequences admitted so
    far) by owner."""
    served: Counter[str] = Counter()
    admitted: Counter[str] = Counter()
    out = []
    for method, request in calls:
        if method == "Prefill":
            new, running = list(request.sequences), []
        elif method == "Decode":
            new, running = list(request.joining), list(request.request_ids)
        else:
            continue
        new = [s for s in new if s.request_id in owner]
        running = [r for r in running if r in owner]
        if not new and not running:
            continue
        for s in new:
            served[owner[s.request_id]] += INPUT_TOKEN_COST * len(s.token_ids) + OUTPUT_TOKEN_COST
            admitted[owner[s.request_id]] += 1
        for rid in running:
            served[owner[rid]] += OUTPUT_TOKEN_COST
        out.append((Counter(served), Counter(admitted)))
    return out


def _gaps_while_backlogged(
    timeline: list[tuple[Counter, Counter]], totals: dict[str, int], weights: dict[str, float] | None = None
) -> list[float]:
    """The spread of weighted service at each step where every owner still had a request waiting before
    that step's admissions."""
    weights = weights or {}
    gaps = []
    before: Counter[str] = Counter()
    for served, admitted in timeline:
        if all(before[o] < n for o, n in totals.items()):
            shares = [served[o] / weights.get(o, 1.0) for o in totals]
            gaps.append(max(shares) - min(shares))
        before = admitted
    return gaps


async def test_backlogged_adapters_alternate_within_the_bound(start_router):
    h = await start_router(world_size=1, max_batch_size=2)
    jobs = [(A, 4, 6)] * 12 + [(B, 12, 3)] * 12  # A first: FIFO would serve all of A before any B
    seqs = await _submit(h, jobs)
    await _ended(seqs)
    owner = {s.id: a for s, (a, _, _) in zip(seqs, jobs, strict=True)}
    timeline = _service(h.fakes[0].calls, owner)
    gaps = _gaps_while_backlogged(timeline, {A: 12, B: 12})
    bound = _bound(prompt=12, new=6, batch=2)
    assert len(gaps) >= 10 and max(gaps) <= bound, (max(gaps), bound)
    # The first admissions alternate (a tie goes to the older request).
    order = [owner[s.request_id] for m, r in h.fakes[0].calls if m == "Prefill" for s in r.sequences]
    assert order[:2] == [A, B]
    await h.settle()


async def test_an_adapter_returning_from_idle_gets_no_credit(start_router):
    h = await start_router(world_size=1, max_batch_size=2)
    for f in h.fakes:
        f.step_delay = 0.002
    first = await _submit(h, [(A, 4, 6)] * 24)
    # B was idle while A was served; when it comes back with a backlog of its own, it is lifted to A's
    # counter, so the two alternate from there instead of B taking every slot until it has caught up.
    async with asyncio.timeout(10):
        while sum(1 for s in first if s.admitted_at is not None) < 10:
            await asyncio.sleep(0.001)
    late = await _submit(h, [(B, 4, 6)] * 8)
    arrived = len(h.fakes[0].calls)  # B was lifted to A's counter just now
    await _ended(first + late)
    owner = {s.id: A for s in first} | {s.id: B for s in late}
    admissions = [owner[s.request_id] for s in _new_sequences(h.fakes[0]) if s.request_id in owner]
    after = admissions[admissions.index(B) :]
    # Without the lift B, 160 behind, would take all 8 of the next admissions; with it they alternate.
    assert after[:8].count(A) >= 3, admissions
    # Service since B's return, when both counters were equal: within the bound, give or take the
    # output of the step that was in flight then (the fake saw it before the router charged it).
    before = _service(h.fakes[0].calls[:arrived], owner)
    base_served, base_admitted = before[-1]
    timeline = _service(h.fakes[0].calls, owner)[len(before) :]
    since = [(served - base_served, admitted - base_admitted) for served, admitted in timeline]
    a_left = 24 - base_admitted[A]
    assert a_left >= 4, "A was no longer backlogged when B returned"
    gaps = _gaps_while_backlogged(since, {A: a_left, B: 8})
    in_flight = OUTPUT_TOKEN_COST * 2  # one step of A's two rows
    assert gaps and max(gaps) <= _bound(prompt=4, new=6, batch=2) + in_flight, (max(gaps), admissions)
    await h.settle()


async def test_weights_give_a_proportional_share(start_router):
    h = await start_router(world_size=1, max_batch_size=2, adapter_weights={A: 3.0})
    jobs = [(B, 4, 4)] * 12 + [(A, 4, 4)] * 24
    seqs = await _submit(h, jobs)
    await _ended(seqs)
    owner = {s.id: a for s, (a, _, _) in zip(seqs, jobs, strict=True)}
    timeline = _service(h.fakes[0].calls, owner)
    totals = {A: 24, B: 12}
    gaps = _gaps_while_backlogged(timeline, totals, {A: 3.0})
    assert gaps and max(gaps) <= _bound(prompt=4, new=4, batch=2)
    # While both were waiting, A got about 3x B's service (1x without the weight).
    last = max(
        i for i, (_, admitted) in enumerate(timeline) if all(admitted[o] < n for o, n in totals.items())
    )
    served = timeline[last][0]
    assert 2.2 < served[A] / served[B] < 3.8, served
    await h.settle()


async def test_tenants_share_before_adapters(start_router):
    h = await start_router(world_size=1, max_batch_size=2, api_keys={"alice": "ka", "bob": "kb"})
    # alice spreads over three "adapters" (base, A, B); bob sends base-model requests only.
    alice = await _submit(h, [(None, 4, 4), (A, 4, 4), (B, 4, 4)] * 6, tenant="alice")
    bob = await _submit(h, [(None, 4, 4)] * 18, tenant="bob")
    await _ended(alice + bob)
    owner = {s.id: "alice" for s in alice} | {s.id: "bob" for s in bob}
    timeline = _service(h.fakes[0].calls, owner)
    gaps = _gaps_while_backlogged(timeline, {"alice": 18, "bob": 18})
    assert len(gaps) >= 10 and max(gaps) <= _bound(prompt=4, new=4, batch=2)
    # Within alice's share, her three adapters take turns.
    alice_ids = {s.id: a for s, a in zip(alice, [None, A, B] * 6, strict=True)}
    order = [alice_ids[s.request_id] for s in _new_sequences(h.fakes[0]) if s.request_id in alice_ids]
    assert order[:3] == [None, A, B]
    assert {s.fair_client for s in bob} == {("bob", BASE_MODEL_ID)}
    await h.settle()


def _new_sequences(fake) -> list:
    return [
        s
        for m, r in fake.calls
        if m in ("Prefill", "Decode")
        for s in (r.sequences if m == "Prefill" else r.joining)
    ]


async def test_the_key_a_request_carries_names_its_tenant(start_router):
    h = await start_router(world_size=1, api_key="kd", api_keys={"alice": "ka", "bob": "kb"})
    for key, tenant in (("ka", "alice"), ("kb", "bob"), ("kd", "default")):
        resp = await h.http.post(
            "/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, "adapter_id": A}},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status == 200, await resp.text()
        assert h.state.scheduler.fairness.rank((tenant, A)) > (0, 0), tenant
    resp = await h.http.post("/generate", json={"inputs": "Hi"}, headers={"Authorization": "Bearer kx"})
    assert resp.status == 401
    await h.settle()


async def test_one_adapter_full_share_is_a_429_naming_it(start_router):
    # 8 concurrent requests, a quarter each: 2 waiting per adapter.
    h = await start_router(
        world_size=1, max_batch_size=1, max_concurrent_requests=8, adapter_queue_share=0.25
    )
    for f in h.fakes:
        f.step_delay = 0.02
    running = [asyncio.create_task(h.generate("Hi", max_new_tokens=20, adapter_id=A))]
    async with asyncio.timeout(5):
        while not h.state.scheduler.running:
            await asyncio.sleep(0.002)
    waiting = [asyncio.create_task(h.generate("Hi", max_new_tokens=2, adapter_id=A)) for _ in range(2)]
    async with asyncio.timeout(5):
        while len(h.state.scheduler.queue) < 2:
            await asyncio.sleep(0.002)
    metrics = await (await h.http.get("/metrics")).text()
    assert f'\nmultilora_queue_size{{adapter="{A}"}} 2\n' in metrics
    resp = await h.generate("Hi", max_new_tokens=2, adapter_id=A)
    assert resp.status == 429
    assert await resp.json() == {
        "error": f"Model is overloaded: adapter `{A}` already has 2 requests waiting, its share of the queue",
        "error_type": "overloaded",
    }
    # Another adapter's requests are still taken.
    other = asyncio.create_task(h.generate("Hi", max_new_tokens=2, adapter_id=B))
    ok = [await t for t in (*running, *waiting, other)]
    assert [r.status for r in ok] == [200] * 4
    assert (await h.generate("Hi", max_new_tokens=2, adapter_id=A)).status == 200  # room again
    await h.settle()
