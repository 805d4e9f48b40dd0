"""The fairness policy on its own (plain Python): virtual token counters, their lift, weights, tenants,
and the fair queue's admission order, cap, slack and re-queue. Expected orders are worked out by hand
from the documented costs (a prompt token costs 1, a generated token 2, divided by the weight)."""

from __future__ import annotations

import pytest

from proto import generate_pb2 as pb
from router.block_manager import BlockManager
from router.errors import AdapterQueueFullError
from router.fairness import FairnessConfig, FairnessLedger, VirtualTokenCounter
from router.queue import RequestQueue
from router.sequence import Sequence, SequenceParams, Status
from router.tokenizer import ModelTokenizer

BIG = dict(min_size=0, max_size=None, prefill_budget=10_000, token_budget=10_000)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return ModelTokenizer.from_model_dir(tiny_tokenizer_dir)


@pytest.fixture
def make(tokenizer):
    """`make(adapter, prompt=4, new=4, tenant="")` -> a Sequence charged to (tenant, adapter); ids 1, 2..."""
    ids = iter(range(1, 1000))

    def make(adapter: str, prompt: int = 4, new: int = 4, tenant: str = "") -> Sequence:
        params = SequenceParams(input_ids=(5,) * prompt, max_new_tokens=new, sampling=pb.SamplingParameters())
        return Sequence(next(ids), params, tokenizer, fair_client=(tenant, adapter))

    return make


def _queue(config: FairnessConfig | None = None, **kw) -> RequestQueue:
    return RequestQueue(BlockManager(num_blocks=1000, block_size=4), FairnessLedger(config), **kw)


def _names(batch: list[Sequence], names: dict[int, str]) -> list[str]:
    return [names[s.id] for s in batch]


def test_counter_charges_by_weight_and_lifts_an_arrival():
    c = VirtualTokenCounter({"heavy": 2.0})
    c.charge("a", 10)
    c.charge("heavy", 10)
    assert (c["a"], c["heavy"], c["never"]) == (10, 5, 0)
    # An arrival while others are backlogged starts at the lowest of them: no credit for its idle time.
    c.arrive("b", {"a", "heavy"})
    assert c["b"] == 5
    # One that was served more than that keeps its own counter (it is not forgiven either).
    c.charge("c", 50)
    c.arrive("c", {"a"})
    assert c["c"] == 50
    # With nobody backlogged, the floor is the counter of the last one that stopped being backlogged.
    c.leave("a")
    c.arrive("d", set())
    assert c["d"] == 10


def test_admission_alternates_between_equal_adapters(make):
    q = _queue()
    a = [make("A") for _ in range(3)]
    b = [make("B") for _ in range(3)]
    for s in a + b:
        q.append(s)
    names = {s.id: f"A{i}" for i, s in enumerate(a)} | {s.id: f"B{i}" for i, s in enumerate(b)}
    # FIFO would admit A0 A1 A2 B0; each admission charges its prompt, so the lowest counter alternates
    # (ties go to the older head).
    assert _names(q.next_batch(**{**BIG, "max_size": 4}), names) == ["A0", "B0", "A1", "B1"]
    assert all(s.status is Status.RUNNING for s in (a[0], a[1], b[0], b[1])) and len(q) == 2


def test_generated_tokens_move_the_order(make):
    q = _queue()
    a, b = [make("A") for _ in range(2)], [make("B") for _ in range(2)]
    for s in a + b:
        q.append(s)
    assert q.next_batch(**{**BIG, "max_size": 2}) == [a[0], b[0]]
    q.ledger.charge(("", "A"), output=3)  # A's running sequence produced 3 tokens, B's none
    assert q.next_batch(**{**BIG, "max_size": 1}) == [b[1]]
    assert q.next_batch(**{**BIG, "max_size": 1}) == [a[1]]


def test_an_adapter_returning_from_idle_is_lifted(make):
    q = _queue()
    first = make("B")
    q.append(first)
    assert q.next_batch(**BIG) == [first]  # B served 4, then idle
    a = [make("A", prompt=20) for _ in range(4)]
    for s in a:
        q.append(s)
    # A arrived with nobody waiting: it starts at B's 4 (the last to leave), then is served 40.
    q.next_batch(**{**BIG, "max_size": 2})
    late = [make("B") for _ in range(2)]
    for s in late:
        q.append(s)
    # B is lifted from 4 to A's 44: it does not get the next 10 admissions to "catch up"; one, then A.
    assert q.ledger.rank(("", "B")) == q.ledger.rank(("", "A")) == (44, 44)
    assert q.next_batch(**{**BIG, "max_size": 2}) == [a[2], late[0]]


def test_weights_share_admissions(make):
    q = _queue(FairnessConfig(adapter_weights={"A": 2.0}))
    a, b = [make("A") for _ in range(4)], [make("B") for _ in range(4)]
    for s in a + b:
        q.append(s)
    # A's admissions cost 4/2 = 2, B's 4: (0,0) A, (2,0) B, (2,4) A, (4,4) A (older head), (6,4) B,
    # (6,8) A.
    assert q.next_batch(**{**BIG, "max_size": 6}) == [a[0], b[0], a[1], a[2], b[1], a[3]]


def test_tenants_share_first_then_their_adapters(make):
    q = _queue(FairnessConfig(by_tenant=True))
    alice = [make(adapter, tenant="alice") for adapter in ("x", "y", "x", "y", "x", "y")]
    bob = [make("z", tenant="bob") for _ in range(3)]
    for s in alice + bob:
        q.append(s)
    # Per adapter, alice's two adapters would get 2 of every 3 admissions; per tenant, bob gets half,
    # and alice's half alternates x and y.
    batch = q.next_batch(**{**BIG, "max_size": 6})
    assert [s.fair_client for s in batch] == [
        ("alice", "x"),
        ("bob", "z"),
        ("alice", "y"),
        ("bob", "z"),
        ("alice", "x"),
        ("bob", "z"),
    ]


def test_a_head_that_does_not_fit_is_passed_over_only_within_the_slack(make):
    big, small = make("A", prompt=40), [make("B", prompt=2) for _ in range(3)]
    q = _queue(overtake_slack=4)
    for s in (big, *small):
        q.append(s)
    # Work-conserving: A's head needs 40 prompt tokens of 20, so B's fit instead, until B is more than
    # 4 ahead of A: 2, 4, then 6 would be past it.
    assert q.next_batch(**{**BIG, "prefill_budget": 20}) == small[:2]
    assert q.next_batch(**{**BIG, "prefill_budget": 20}) == []
    assert q.next_batch(**{**BIG, "prefill_budget": 40}) == [big]
    # Without a slack, anything that fits goes.
    q = _queue()
    big = make("A", prompt=40)
    for s in (big, *[make("B", prompt=2) for _ in range(3)]):
        q.append(s)
    assert len(q.next_batch(**{**BIG, "prefill_budget": 20})) == 3


def test_within_an_adapter_nobody_is_overtaken(make):
    q = _queue()
    big, small = make("A", prompt=10, new=20), make("A", prompt=2, new=2)
    q.append(big)
    q.append(small)
    assert q.next_batch(**{**BIG, "prefill_budget": 9}) == []
    assert q.next_batch(**{**BIG, "prefill_budget": 12}) == [big, small]


def test_min_size_not_met_changes_nothing(make):
    q = _queue()
    a, b = make("A"), make("B")
    q.append(a)
    q.append(b)
    assert q.next_batch(**{**BIG, "min_size": 3}) == []
    assert q.ledger.rank(("", "A")) == q.ledger.rank(("", "B")) == (0, 0) and len(q) == 2
    assert q.next_batch(**{**BIG, "min_size": 2}) == [a, b]


def test_push_front_goes_first_and_is_not_charged_again(make):
    q = _queue()
    waiting = make("B")
    q.append(waiting)
    preempted = [make("A"), make("A")]
    for s in preempted:
        s.status = Status.RUNNING
    q.push_front(preempted[1])  # the newest is preempted first, so the oldest ends up in front
    q.push_front(preempted[0])
    assert list(q) == [*preempted, waiting] and preempted[0].status is Status.WAITING
    assert q.next_batch(**{**BIG, "max_size": 2}) == preempted
    assert q.ledger.rank(("", "A")) == (0, 0)
    # A re-queued sequence that does not fit holds everyone back (they would take its blocks).
    big = make("A", prompt=50)
    q.push_front(big)
    assert q.next_batch(**{**BIG, "prefill_budget": 10}) == []
    assert q.next_batch(**BIG) == [big, waiting]


def test_the_cap_names_the_adapter(make):
    q = _queue(max_queued_per_adapter=2)
    for _ in range(2):
        q.check_room("A", 1)
        q.append(make("A"))
    with pytest.raises(AdapterQueueFullError) as caught:
        q.check_room("A", 1)
    assert caught.value.status == 429 and "adapter `A`" in caught.value.message
    assert caught.value.error_type == "overloaded"
    q.check_room("B", 2)  # another adapter still has room
    with pytest.raises(AdapterQueueFullError):
        q.check_room("B", 3)  # all of a best_of request's sequences or none
    q.next_batch(**{**BIG, "max_size": 1})
    q.check_room("A", 1)  # admission makes room
    assert q.queued_by_adapter() == {"A": 1}
