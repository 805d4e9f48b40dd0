"""Runner-level preemption: a sequence whose block table grows step by step, and one recomputed after
preemption (prompt + its tokens so far, `num_generated`), produce exactly the tokens of an uninterrupted
run with every block up front: greedy and seeded sampling, penalties included (float32); and `grown`
over gRPC."""

from __future__ import annotations

import grpc
import pytest

from proto import generate_pb2 as pb
from tests.worker.engine_scenario import BLOCK_SIZE, build_runner
from tests.worker.server_harness import NUM_BLOCKS, new_sequence, rpc_error
from worker.errors import RequestError
from worker.runner import PrefillRequest
from worker.sampler import SamplingParams

PROMPT = [11, 12, 13, 14, 15, 16]
STEPS = 14
CASES = {
    "greedy": SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2),
    "sampled": SamplingParams(do_sample=True, temperature=1.4, top_k=60, seed=77, repetition_penalty=1.2),
}


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return build_runner(tiny_model_dir, {})[0]


def _blocks(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BLOCK_SIZE)))


def _uninterrupted(runner, params: SamplingParams) -> list[int]:
    whole = PrefillRequest(1, PROMPT, _blocks(0, len(PROMPT) + STEPS), params)
    tokens = [runner.prefill([whole])[0].token_id]
    for _ in range(STEPS - 1):
        tokens.append(runner.decode([1])[0].token_id)
    runner.release([1])
    return tokens


def _grown_then_recomputed(runner, params: SamplingParams, preempt_after: int) -> list[int]:
    """Blocks handed out one at a time (as the router does), preempted after `preempt_after` tokens, then
    recomputed into other blocks and run to the end."""
    table = _blocks(40, len(PROMPT))
    tokens = [runner.prefill([PrefillRequest(2, PROMPT, table, params)])[0].token_id]
    while len(tokens) < preempt_after:
        grown = {}
        if len(PROMPT) + len(tokens) > len(table) * BLOCK_SIZE:
            table = [*table, 40 + len(table)]
            grown = {2: table}
        tokens.append(runner.step([], [2], grown)[0].token_id)
    runner.release([2])
    context = PROMPT + tokens
    again = PrefillRequest(3, context, _blocks(70, len(context) + STEPS), params, num_generated=len(tokens))
    tokens.append(runner.prefill([again])[0].token_id)
    while len(tokens) < STEPS:
        tokens.append(runner.decode([3])[0].token_id)
    runner.release([3])
    return tokens


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("preempt_after", [1, 5])
def test_grown_and_recomputed_equal_uninterrupted(runner, case, preempt_after):
    params = CASES[case]
    expected = _uninterrupted(runner, params)
    assert _grown_then_recomputed(runner, params, preempt_after) == expected


def test_a_recompute_that_forgets_its_draws_differs(runner):
    # The check above can fail: restarting the generator (num_generated=0) changes the continuation.
    params = CASES["sampled"]
    expected = _uninterrupted(runner, params)
    context = PROMPT + expected[:5]
    restarted = runner.prefill([PrefillRequest(4, context, _blocks(0, len(context) + 1), params)])[0]
    runner.release([4])
    resumed = runner.prefill(
        [PrefillRequest(5, context, _blocks(0, len(context) + 1), params, num_generated=5)]
    )[0]
    runner.release([5])
    assert resumed.token_id == expected[5]
    assert restarted.token_id != expected[5]


def test_a_grown_table_must_extend_the_old_one(runner):
    runner.prefill([PrefillRequest(6, PROMPT, _blocks(0, len(PROMPT)))])
    with pytest.raises(RequestError, match="does not extend"):
        runner.step([], [6], {6: [5, 6]})
    runner.release([6])


async def test_decode_grows_block_tables_over_grpc(worker):
    """A Decode's `grown` tables reach the runner; blocks outside the cache are INVALID_ARGUMENT."""
    await worker.stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(1, [3, 4, 5, 6], [0])]))
    full = worker.stub.Decode(pb.DecodeRequest(request_ids=[1]))
    assert "no room" in (await rpc_error(full)).details()  # a 5th token needs a 2nd block
    outside = [pb.BlockTable(request_id=1, block_table=[0, NUM_BLOCKS])]
    err = await rpc_error(worker.stub.Decode(pb.DecodeRequest(request_ids=[1], grown=outside)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside" in err.details()
    grown = [pb.BlockTable(request_id=1, block_table=[0, 7])]
    reply = await worker.stub.Decode(pb.DecodeRequest(request_ids=[1], grown=grown))
    assert len(reply.generations) == 1 and worker.runner.sequences[1].block_table == [0, 7]
