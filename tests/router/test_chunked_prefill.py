"""Chunked prefill against the fake workers: a prompt longer than MAX_BATCH_PREFILL_TOKENS is admitted
and fed in chunks, in order, each at most what the step's prefill budget has left, in join steps where
the running sequences keep decoding; its blocks come chunk by chunk; it neither decodes nor gets a token
before its last chunk; cancelled or preempted mid-prefill, it leaves no block behind (the autouse check
in conftest.py) and a preempted one is recomputed from its first chunk."""

from __future__ import annotations

import asyncio

from proto import generate_pb2 as pb
from router.block_manager import BlockManager
from router.queue import RequestQueue
from router.sequence import Sequence, SequenceParams
from router.tokenizer import ModelTokenizer
from tests.router.conftest import SCRIPTS
from tests.router.test_preemption import SMALL_POOL, _new_sequences

BUDGET = 8
LONG = "The quick brown fox jumps over"  # 30 bytes + BOS: 31 tokens, 4 chunks of at most 8


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def _chunks_of(fake, rid: int) -> list[tuple[str, pb.NewSequence, list[int]]]:
    """(method, chunk, the request ids decoding in that call) for each chunk of `rid`, in call order."""
    out = []
    for method, r in fake.calls:
        if method in ("Prefill", "Decode"):
            for s in r.sequences if method == "Prefill" else r.joining:
                if s.request_id == rid:
                    out.append((method, s, [] if method == "Prefill" else list(r.request_ids)))
    return out


def _prefill_tokens(request) -> int:
    return sum(
        len(s.token_ids) for s in (request.sequences if hasattr(request, "sequences") else request.joining)
    )


async def test_a_long_prompt_comes_in_chunks_while_the_batch_decodes(start_router):
    h = await start_router(world_size=2, max_batch_prefill_tokens=BUDGET)
    for f in h.fakes:
        f.step_delay = 0.002
    sched = h.state.scheduler
    short = asyncio.create_task(h.generate("Hi", max_new_tokens=25))
    await _wait_for(lambda: len(h.fakes[0].requests("Decode")) >= 2)
    (runner,) = sched.running
    long = await h.generate(LONG, max_new_tokens=5, decoder_input_details=True)
    body = await long.json()
    assert long.status == 200 and body["generated_text"] == SCRIPTS[0][:5]
    assert len(body["details"]["prefill"]) == len(LONG) + 1  # prompt logprobs whole, over every chunk
    assert (await short).status == 200
    fake = h.fakes[0]
    long_id = max(s.request_id for s in _new_sequences(fake))
    chunks = _chunks_of(fake, long_id)
    sizes = [len(c.token_ids) for _, c, _ in chunks]
    assert sum(sizes) == len(LONG) + 1 and max(sizes) <= BUDGET and len(sizes) >= 4
    assert [c.num_cached for _, c, _ in chunks] == [sum(sizes[:i]) for i in range(len(sizes))]
    assert [c.more_chunks for _, c, _ in chunks] == [True] * (len(sizes) - 1) + [False]
    for _, c, decoding in chunks:
        # Blocks come chunk by chunk; the running sequence decodes in the chunk's step.
        assert len(c.block_table) == -(-(c.num_cached + len(c.token_ids)) // 4)
        assert decoding == [runner.id]
    # Before its last chunk it was in no Decode's request_ids; every step kept to the budget.
    last = fake.calls.index(
        next((m, r) for m, r in fake.calls if m == "Decode" and chunks[-1][1] in r.joining)
    )
    assert all(long_id not in r.request_ids for m, r in fake.calls[: last + 1] if m == "Decode")
    assert all(_prefill_tokens(r) <= BUDGET for m, r in fake.calls if m in ("Prefill", "Decode"))
    for f in h.fakes:  # both ranks saw the same chunks
        assert [c for _, c, _ in _chunks_of(f, long_id)] == [c for _, c, _ in chunks]


async def test_long_prompts_and_newcomers_share_each_step_budget(start_router):
    h = await start_router(world_size=1, max_batch_prefill_tokens=BUDGET)
    h.fakes[0].step_delay = 0.002
    prompts = [LONG, "Hi", LONG[:20], "Hey", "Hi there"]
    resps = await asyncio.gather(*(h.generate(p, max_new_tokens=6) for p in prompts))
    assert [(await r.json())["generated_text"] for r in resps] == [SCRIPTS[0][:6]] * len(prompts)
    steps = [r for m, r in h.fakes[0].calls if m in ("Prefill", "Decode")]
    assert all(_prefill_tokens(r) <= BUDGET for r in steps)
    # A prompt that fits the budget is never split; the long ones are.
    by_id: dict[int, list] = {}
    for s in _new_sequences(h.fakes[0]):
        by_id.setdefault(s.request_id, []).append(s)
    lengths = sorted(sum(len(c.token_ids) for c in cs) for cs in by_id.values())
    assert lengths == sorted(len(p) + 1 for p in prompts)
    for cs in by_id.values():
        total = sum(len(c.token_ids) for c in cs)
        assert (len(cs) > 1) == (total > BUDGET)


async def test_cancelled_mid_prefill_leaves_nothing_behind(start_router):
    h = await start_router(world_size=2, max_batch_prefill_tokens=4)
    for f in h.fakes:
        f.step_delay = 0.01
    sched = h.state.scheduler
    task = asyncio.create_task(h.generate(LONG, max_new_tokens=5))
    await _wait_for(lambda: any(s.prefilling and s.prefilled >= 8 for s in sched.running))
    (seq,) = sched.running
    task.cancel()  # the client goes away between two chunks
    await h.settle()
    for f in h.fakes:
        assert f.sequences == {}
        assert [list(r.request_ids) for r in f.requests("Release")] == [[seq.id]]
        assert not any(r.request_ids for r in f.requests("Decode"))  # it never decoded
    assert (await h.generate("Hi", max_new_tokens=2)).status == 200


async def test_preempted_mid_prefill_is_recomputed_from_its_first_chunk(start_router):
    # 8 blocks of 4: two short sequences grow while the long prompt (31 tokens, 8 blocks) comes in
    # chunks of 4, so the pool runs out before its last chunk and it, the newest, is preempted.
    h = await start_router(world_size=1, max_batch_prefill_tokens=4, fake=SMALL_POOL, max_total_tokens=32)
    h.fakes[0].step_delay = 0.002
    shorts = [asyncio.create_task(h.generate("Hi", max_new_tokens=12)) for _ in range(2)]
    await _wait_for(lambda: len(h.fakes[0].requests("Decode")) >= 1)
    long = await h.generate(LONG, max_new_tokens=1)
    assert (await long.json())["generated_text"] == SCRIPTS[0][:1]
    assert [(await (await r).json())["generated_text"] for r in shorts] == [SCRIPTS[0][:12]] * 2
    fake = h.fakes[0]
    long_id = max(s.request_id for s in _new_sequences(fake))
    starts = [i for i, (_, c, _) in enumerate(_chunks_of(fake, long_id)) if c.num_cached == 0]
    assert len(starts) >= 2, "it was not preempted mid-prefill"
    chunks = [c for _, c, _ in _chunks_of(fake, long_id)]
    assert chunks[starts[1] - 1].more_chunks  # preempted before its last chunk
    assert any(long_id in r.request_ids for r in fake.requests("Release")[:-1])


def test_the_queue_admits_a_long_prefill_with_a_first_chunk(tiny_tokenizer_dir):
    tokenizer = ModelTokenizer.from_model_dir(tiny_tokenizer_dir)
    bm = BlockManager(num_blocks=100, block_size=4)
    q = RequestQueue(bm)

    def seq(rid: int, n: int) -> Sequence:
        params = SequenceParams(input_ids=(5,) * n, max_new_tokens=4, sampling=pb.SamplingParameters())
        return Sequence(rid, params, tokenizer)

    short, long, fits = seq(1, 5), seq(2, 20), seq(3, 8)
    for s in (short, long, fits):
        q.append(s)
    kw = dict(min_size=0, max_size=None, token_budget=1000, chunk_over=8)
    # The short one fits whole; the long one takes what is left (3 tokens, 1 block); one of 8 would fit
    # a whole step's budget, so it is not split but waits.
    assert q.next_batch(prefill_budget=8, **kw) == [short, long]
    assert (long.chunk_end, len(long.blocks), long.prefilling) == (3, 1, True)
    first = long.to_pb()
    assert (list(first.token_ids), first.num_cached, first.more_chunks) == ([5] * 3, 0, True)
    assert q.next_batch(prefill_budget=7, **kw) == []
    assert q.next_batch(prefill_budget=8, **kw) == [fits]
    for s in (short, long, fits):
        bm.free(s.blocks)
