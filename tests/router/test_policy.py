"""The plain-Python policy pieces on their own: block manager, admission, limits, stop matching."""

from __future__ import annotations

import pytest

from proto import generate_pb2 as pb
from router.block_manager import BlockManager
from router.config import RouterConfig
from router.limits import Limits
from router.queue import RequestQueue
from router.sequence import Sequence, SequenceParams, Status, _StopMatcher
from router.tokenizer import ModelTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return ModelTokenizer.from_model_dir(tiny_tokenizer_dir)


def _seq(tokenizer, i: int, prompt: int, new: int) -> Sequence:
    params = SequenceParams(input_ids=(5,) * prompt, max_new_tokens=new, sampling=pb.SamplingParameters())
    return Sequence(i, params, tokenizer)


def test_block_manager_allocates_and_frees():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.blocks_for(1) == 1 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    a = bm.allocate(9)  # 3 blocks
    b = bm.allocate(16)  # 4 blocks
    assert a == [0, 1, 2] and b == [3, 4, 5, 6]
    assert bm.num_free == 3 and bm.can_allocate(12) and not bm.can_allocate(13)
    with pytest.raises(RuntimeError):
        bm.allocate(13)
    bm.free(a)
    assert bm.num_free == 6
    c = bm.allocate(24)
    assert sorted(c) == sorted({0, 1, 2, 7, 8, 9}) and not set(c) & set(b)
    bm.free(b)
    bm.free(c)
    assert bm.num_free == 10


def test_admission_is_fifo_and_bounded(tokenizer):
    bm = BlockManager(num_blocks=10, block_size=4)  # 40 tokens
    q = RequestQueue(bm)
    big, small1, small2 = _seq(tokenizer, 1, 10, 20), _seq(tokenizer, 2, 2, 2), _seq(tokenizer, 3, 2, 2)
    for s in (big, small1, small2):
        q.append(s)
    kw = dict(min_size=0, max_size=None, prefill_budget=100)
    # Blocks on demand: the head takes its prompt's 3 blocks (12 tokens), nothing for its 20 new tokens.
    # It does not fit the token budget: nobody behind it is admitted either.
    assert q.next_batch(token_budget=11, **kw) == []
    assert q.next_batch(token_budget=12, **kw) == [big]
    assert big.status is Status.RUNNING and len(big.blocks) == 3 and bm.num_free == 7
    # Each small one takes its 2 prompt tokens' block.
    assert q.next_batch(token_budget=100, **kw) == [small1, small2]
    assert bm.num_free == 5 and len(q) == 0


def test_admission_budgets(tokenizer):
    q = RequestQueue(BlockManager(num_blocks=100, block_size=4))
    seqs = [_seq(tokenizer, i, 6, 4) for i in range(5)]
    for s in seqs:
        q.append(s)
    assert q.next_batch(min_size=0, max_size=None, prefill_budget=12, token_budget=1000) == seqs[:2]
    assert q.next_batch(min_size=0, max_size=1, prefill_budget=100, token_budget=1000) == seqs[2:3]
    # min_size: not enough waiting to be worth pausing the running batch.
    assert q.next_batch(min_size=3, max_size=None, prefill_budget=100, token_budget=1000) == []
    assert len(q) == 2
    assert q.next_batch(min_size=2, max_size=None, prefill_budget=100, token_budget=1000) == seqs[3:]


def test_cancelled_entries_are_skipped(tokenizer):
    q = RequestQueue(BlockManager(num_blocks=100, block_size=4))
    a, b = _seq(tokenizer, 1, 2, 2), _seq(tokenizer, 2, 2, 2)
    q.append(a)
    q.append(b)
    a.cancelled = True
    assert q.next_batch(min_size=0, max_size=None, prefill_budget=100, token_budget=100) == [b]
    assert len(q) == 0


def _config(**kw) -> RouterConfig:
    return RouterConfig(model_id="m", model_dir="/m", worker_uds=["/s"], **kw)


def test_limits_derivation():
    lim = Limits.resolve(_config(), num_blocks=1000, block_size=16, max_position=8192)
    # total = min(capacity 16000, max_position 8192); input = total - 1 (long prompts are chunked).
    assert (lim.max_total_tokens, lim.max_input_tokens, lim.max_batch_total_tokens) == (8192, 8191, 16000)
    lim = Limits.resolve(
        _config(max_batch_prefill_tokens=10000), num_blocks=1000, block_size=16, max_position=8192
    )
    assert lim.max_input_tokens == 8191
    lim = Limits.resolve(_config(), num_blocks=10, block_size=16, max_position=8192)
    assert (lim.max_total_tokens, lim.max_input_tokens, lim.max_batch_prefill_tokens) == (160, 159, 160)


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        (("world",), [" hello", " wor", "ld!"], (2, 2)),  # completes inside the third token, 2 chars in
        (("lo w",), [" hel", "lo", " w", "x"], (2, 2)),
        (("abc", "b"), ["a", "bc"], (1, 1)),  # the earliest-ending stop wins
        (("zz",), ["z", "", "z"], (2, 1)),
        (("q",), ["abc"], None),
    ],
)
def test_stop_matcher(stops, pieces, expected):
    m = _StopMatcher(stops)
    found = None
    for i, piece in enumerate(pieces):
        end = m.feed(piece)
        if end is not None:
            found = (i, end)
            break
    assert found == expected
