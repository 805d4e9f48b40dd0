"""The worker's gRPC server, driven through the generated stub over a unix socket.

Steps served over gRPC must give the tokens and logprobs of a `ModelRunner` driven directly with the same
calls; bad requests map to INVALID_ARGUMENT, internal failures to INTERNAL plus an unhealthy rank.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from proto import generate_pb2 as pb
from tests.worker.engine_scenario import generation_of
from tests.worker.server_harness import (
    ADAPTERS,
    BLOCK_SIZE,
    NUM_BLOCKS,
    as_tuples,
    load_adapters,
    new_sequence,
    rpc_error,
    worker_config,
)
from worker.lora.adapter import load_peft_adapter
from worker.runner import ModelRunner, PrefillRequest
from worker.sampler import SamplingParams


async def test_info_and_health(worker):
    info = await worker.stub.Info(pb.InfoRequest())
    assert (info.model_type, info.architecture) == ("llama", "LlamaForCausalLM")
    assert (info.dtype, info.device_type) == ("float32", "cpu")
    assert (info.vocab_size, info.max_position_embeddings) == (251, 256)
    assert (info.block_size, info.num_blocks) == (BLOCK_SIZE, NUM_BLOCKS)
    assert (info.num_adapter_slots, info.max_lora_rank) == (len(ADAPTERS), 64)
    assert (info.world_size, info.rank) == (1, 0)
    await worker.stub.Health(pb.HealthRequest())


# request id -> (adapter slot, prompt length, sampling params, prompt_logprobs)
# (Float parameters are exact in float32, the proto's type, so both paths sample from the same values.)
REQUESTS = {
    0: (0, 5, dict(top_n_tokens=5), False),
    1: (1, 9, dict(do_sample=True, temperature=0.75, top_k=20, seed=7), False),
    2: (2, 3, dict(repetition_penalty=1.25, frequency_penalty=0.5, top_n_tokens=2), True),
    3: (3, 6, dict(do_sample=True, top_p=0.875, seed=3), False),
    4: (1, 2, dict(), False),
    5: (2, 7, dict(do_sample=True, typical_p=0.75, seed=11, top_n_tokens=3), True),
}
# The schedule: a mixed-adapter prefill, decodes, one sequence leaves, two join, more decodes.
# Each sequence gets the blocks of its whole length at its prefill, as the router allocates them.
SCHEDULE = [
    ("prefill", [0, 1, 2, 3]),
    ("decode", [0, 1, 2, 3]),
    ("decode", [0, 1, 2, 3]),
    ("release", [2]),
    ("prefill", [4, 5]),
    ("decode", [0, 1, 3, 4, 5]),
    ("decode", [0, 1, 3, 4, 5]),
    ("decode", [0, 1, 3, 4, 5]),
]


MAX_DECODES = sum(kind == "decode" for kind, _ in SCHEDULE)


def scripted_steps(vocab: int):
    """Yield (kind, payload) with block tables: prefill -> [(rid, slot, tokens, table, params, plp)];
    decode -> rids; release -> rids."""
    gen = torch.Generator().manual_seed(0)
    free = list(range(NUM_BLOCKS))
    tables: dict[int, list[int]] = {}
    for kind, rids in SCHEDULE:
        if kind == "prefill":
            seqs = []
            for rid in rids:
                slot, n, params, plp = REQUESTS[rid]
                tokens = torch.randint(3, vocab, (n,), generator=gen).tolist()
                num_blocks = -(-(n + MAX_DECODES) // BLOCK_SIZE)
                tables[rid], free = free[:num_blocks], free[num_blocks:]
                seqs.append((rid, slot, tokens, list(tables[rid]), params, plp))
            yield kind, seqs
        elif kind == "decode":
            yield kind, rids
        else:
            for rid in rids:
                free[:0] = tables.pop(rid)  # reused first, so stale cache contents would show
            yield kind, rids


async def run_over_grpc(stub, vocab) -> list[list[tuple]]:
    results = []
    for kind, payload in scripted_steps(vocab):
        if kind == "prefill":
            seqs = [
                new_sequence(rid, tokens, table, slot, **params)
                for rid, slot, tokens, table, params, _ in payload
            ]
            for seq, (*_, plp) in zip(seqs, payload, strict=True):
                seq.prompt_logprobs = plp
            reply = await stub.Prefill(pb.PrefillRequest(sequences=seqs))
        elif kind == "decode":
            reply = await stub.Decode(pb.DecodeRequest(request_ids=payload))
        else:
            await stub.Release(pb.ReleaseRequest(request_ids=payload))
            continue
        assert reply.forward_ns > 0
        results.append(as_tuples(reply.generations))
    return results


def direct_runner(model_dir, tiny_adapters) -> ModelRunner:
    """A runner with ADAPTERS loaded as load_adapters loads them over gRPC."""
    runner = ModelRunner(worker_config(model_dir))
    num_layers = runner.hf_config.num_hidden_layers
    for slot, name in enumerate(ADAPTERS, start=1):
        adapter = load_peft_adapter(name, tiny_adapters[name], num_layers, runner.module_shapes())
        runner.load_adapter(slot, adapter, generation_of(slot))
    return runner


def run_directly(runner: ModelRunner) -> list[list[tuple]]:
    results = []
    for kind, payload in scripted_steps(runner.hf_config.vocab_size):
        if kind == "prefill":
            reqs = [
                PrefillRequest(rid, tokens, table, SamplingParams(**params), slot, plp, generation_of(slot))
                for rid, slot, tokens, table, params, plp in payload
            ]
            outputs = runner.prefill(reqs)
        elif kind == "decode":
            outputs = runner.decode(payload)
        else:
            runner.release(payload)
            continue
        for o in outputs:
            o.prompt_logprobs = o.prompt_logprobs or []
        results.append(as_tuples(outputs))
    return results


async def test_steps_equal_direct_runner(worker, tiny_model_dir, tiny_adapters):
    await load_adapters(worker.stub, tiny_adapters)
    served = await run_over_grpc(worker.stub, worker.runner.hf_config.vocab_size)

    direct = run_directly(direct_runner(tiny_model_dir, tiny_adapters))

    assert len(served) == len(direct) == 7
    for step, (got, want) in enumerate(zip(served, direct, strict=True)):
        assert [g[0] for g in got] == [w[0] for w in want], f"step {step}: generations not in request order"
        for g, w in zip(got, want, strict=True):
            rid = g[0]
            assert g[1] == w[1], f"step {step}, request {rid}: token differs"
            assert g[3] == w[3], f"step {step}, request {rid}: top token ids differ"
            # Floats travel as float32 in the proto; the runner's are float32 values too.
            assert g[2] == pytest.approx(w[2], abs=1e-6)
            assert g[4] == pytest.approx(w[4], abs=1e-6)
            assert g[5] == pytest.approx(w[5], abs=1e-6)
    # The prefill steps asked for prompt logprobs of requests 2 and 5 only.
    assert [len(g[5]) for g in served[0]] == [0, 0, 2, 0]
    assert [len(g[5]) for g in served[3]] == [0, 6]


async def test_join_step_equals_direct_runner(worker, tiny_model_dir, tiny_adapters):
    """A Decode with joining sequences: their first tokens, then the running ones', as runner.step gives."""
    await load_adapters(worker.stub, tiny_adapters)
    first = [new_sequence(1, [3, 4, 5], [0], slot=1), new_sequence(2, [6, 7], [1], slot=2)]
    joining = [new_sequence(3, [8, 9, 10, 11], [2], slot=3, top_n_tokens=2), new_sequence(4, [5], [3])]
    await worker.stub.Prefill(pb.PrefillRequest(sequences=first))
    reply = await worker.stub.Decode(pb.DecodeRequest(request_ids=[2, 1], joining=joining))
    served = as_tuples(reply.generations)

    runner = direct_runner(tiny_model_dir, tiny_adapters)
    greedy = SamplingParams()

    def request(rid, tokens, blocks, params, slot):
        return PrefillRequest(rid, tokens, blocks, params, slot, adapter_generation=generation_of(slot))

    runner.prefill([request(1, [3, 4, 5], [0], greedy, 1), request(2, [6, 7], [1], greedy, 2)])
    outputs = runner.step(
        [request(3, [8, 9, 10, 11], [2], SamplingParams(top_n_tokens=2), 3), request(4, [5], [3], greedy, 0)],
        [2, 1],
    )
    direct = [(o.request_id, o.token_id, o.logprob, o.top_token_ids) for o in outputs]
    assert [g[0] for g in served] == [3, 4, 2, 1]
    assert [(g[0], g[1], g[3]) for g in served] == [(w[0], w[1], w[3]) for w in direct]
    assert [g[2] for g in served] == pytest.approx([w[2] for w in direct], abs=1e-6)
    assert len(served[0][3]) == 2


async def test_join_step_with_a_duplicate_id_is_invalid_argument(worker):
    await worker.stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(1, [3, 4], [0])]))
    call = worker.stub.Decode(pb.DecodeRequest(request_ids=[1], joining=[new_sequence(1, [5], [1])]))
    err = await rpc_error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request 1" in err.details()


async def test_release_and_clear_cache(worker):
    stub = worker.stub
    await stub.Prefill(
        pb.PrefillRequest(sequences=[new_sequence(7, [5, 6, 7], [0]), new_sequence(8, [9, 10], [1])])
    )
    await stub.Release(pb.ReleaseRequest(request_ids=[7, 99]))  # unknown ids are ignored
    assert set(worker.runner.sequences) == {8}
    err = await rpc_error(stub.Decode(pb.DecodeRequest(request_ids=[7])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request 7" in err.details()
    await stub.Decode(pb.DecodeRequest(request_ids=[8]))
    await stub.ClearCache(pb.ClearCacheRequest())
    assert worker.runner.sequences == {}
    err = await rpc_error(stub.Decode(pb.DecodeRequest(request_ids=[8])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request 8" in err.details()
    await stub.Health(pb.HealthRequest())


BAD_REQUESTS = {
    "unknown request id": (lambda s: s.Decode(pb.DecodeRequest(request_ids=[42])), "request 42"),
    "adapter path missing": (
        lambda s: s.LoadAdapter(
            pb.LoadAdapterRequest(slot=1, adapter_id="ghost", path="/no/such/adapter", generation=1)
        ),
        "adapter 'ghost': '/no/such/adapter' is not a directory",
    ),
    "adapter slot out of range": (
        lambda s: s.LoadAdapter(pb.LoadAdapterRequest(slot=9, adapter_id="ghost", path="/x", generation=1)),
        "adapter 'ghost': slot 9 is not an adapter slot; this worker has slots 1..3",
    ),
    "load generation 0": (
        lambda s: s.LoadAdapter(pb.LoadAdapterRequest(slot=1, adapter_id="ghost", path="/x")),
        "adapter 'ghost': generation 0 is not a load generation",
    ),
    "unload of an empty slot": (
        lambda s: s.UnloadAdapter(pb.UnloadAdapterRequest(slot=2, generation=5)),
        "unload of slot 2 generation 5: the slot is empty",
    ),
    "unload slot out of range": (
        lambda s: s.UnloadAdapter(pb.UnloadAdapterRequest(slot=0, generation=5)),
        "unload of slot 0 generation 5: slot 0 is not an adapter slot",
    ),
    "slot 0 with a generation": (
        lambda s: s.Prefill(pb.PrefillRequest(sequences=[new_sequence(8, [3], [0], generation=4)])),
        "request 8: lora_slot 0 (no adapter) needs adapter_generation 0, got 4",
    ),
    "block table too small": (
        lambda s: s.Prefill(pb.PrefillRequest(sequences=[new_sequence(3, list(range(3, 12)), [0, 1])])),
        "request 3: 2 blocks of 4 cannot hold 9 tokens",
    ),
    "block id out of range": (
        lambda s: s.Prefill(pb.PrefillRequest(sequences=[new_sequence(4, [3, 4], [NUM_BLOCKS])])),
        f"request 4: block {NUM_BLOCKS} is outside",
    ),
    "bad sampling parameter": (
        lambda s: s.Prefill(pb.PrefillRequest(sequences=[new_sequence(5, [3, 4], [0], temperature=-1.0)])),
        "request 5: temperature must be > 0",
    ),
    "duplicate request id": (
        lambda s: s.Prefill(
            pb.PrefillRequest(sequences=[new_sequence(6, [3], [0]), new_sequence(6, [4], [1])])
        ),
        "request 6 appears twice",
    ),
    "slot without adapter": (
        lambda s: s.Prefill(pb.PrefillRequest(sequences=[new_sequence(7, [3], [0], slot=2)])),
        f"request 7: no adapter is loaded in slot 2 (the request expects generation {generation_of(2)})",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_request_is_invalid_argument(worker, case):
    call, message = BAD_REQUESTS[case]
    err = await rpc_error(call(worker.stub))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()
    await worker.stub.Health(pb.HealthRequest())  # a bad request leaves the rank healthy
    assert worker.runner.sequences == {}


async def test_decode_without_room_is_invalid_argument(worker):
    await worker.stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(1, [3, 4, 5, 6], [0])]))
    err = await rpc_error(worker.stub.Decode(pb.DecodeRequest(request_ids=[1])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 1: its block table has no room" in err.details()
    assert worker.runner.sequences[1].num_cached == 4  # refused before any state changed


async def test_unset_parameters_mean_greedy_defaults(worker):
    seq = pb.NewSequence(request_id=1, token_ids=[3, 4, 5], block_table=[0])
    zeroed = pb.NewSequence(
        request_id=2, token_ids=[3, 4, 5], block_table=[1], parameters=pb.SamplingParameters()
    )
    reply = await worker.stub.Prefill(pb.PrefillRequest(sequences=[seq, zeroed]))
    a, b = reply.generations
    assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob)


async def test_internal_failure_marks_rank_unhealthy(worker, monkeypatch, caplog):
    await worker.stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(11, [3, 4], [0])]))
    gate, started = threading.Event(), threading.Event()

    def broken_step(new, request_ids, grown=None):
        started.set()
        assert gate.wait(10)
        raise RuntimeError("device fell over")

    monkeypatch.setattr(worker.runner, "step", broken_step)
    failing = asyncio.ensure_future(worker.stub.Decode(pb.DecodeRequest(request_ids=[11])))
    assert await asyncio.to_thread(started.wait, 10)
    # A step that arrived before the failure is known must not run either.
    queued = asyncio.ensure_future(
        worker.stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(12, [3], [1])]))
    )
    await asyncio.sleep(0.1)
    gate.set()

    err = await rpc_error(failing)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "rank 0: RuntimeError: device fell over"
    assert any("Decode failed (request ids [11])" in r.getMessage() for r in caplog.records)
    err = await rpc_error(queued)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "device fell over" in err.details()
    assert 12 not in worker.runner.sequences

    err = await rpc_error(worker.stub.Health(pb.HealthRequest()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "rank 0 is unhealthy since a step failed: RuntimeError: device fell over"
    err = await rpc_error(worker.stub.Decode(pb.DecodeRequest(request_ids=[11])))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert (await worker.stub.Info(pb.InfoRequest())).num_blocks == NUM_BLOCKS


async def test_steps_run_one_at_a_time_in_arrival_order(worker, monkeypatch):
    gate, started, calls = threading.Event(), threading.Event(), []
    prefill, release = worker.runner.prefill, worker.runner.release

    def slow_prefill(requests):
        calls.append(("prefill", threading.get_ident()))
        started.set()
        assert gate.wait(10)
        return prefill(requests)

    def recorded_release(ids):
        calls.append(("release", threading.get_ident()))
        release(ids)

    monkeypatch.setattr(worker.runner, "prefill", slow_prefill)
    monkeypatch.setattr(worker.runner, "release", recorded_release)
    step = asyncio.ensure_future(
        worker.stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(1, [3], [0])]))
    )
    assert await asyncio.to_thread(started.wait, 10)
    queued = asyncio.ensure_future(worker.stub.Release(pb.ReleaseRequest(request_ids=[1])))
    await asyncio.sleep(0.1)
    # Health answers while the step blocks, and the Release waits behind the step.
    await asyncio.wait_for(worker.stub.Health(pb.HealthRequest()), timeout=2)
    assert [c[0] for c in calls] == ["prefill"] and not queued.done()
    gate.set()
    await step
    await queued
    assert [c[0] for c in calls] == ["prefill", "release"]
    assert calls[0][1] == calls[1][1] != threading.get_ident()  # one step thread, off the event loop
    assert worker.runner.sequences == {}
