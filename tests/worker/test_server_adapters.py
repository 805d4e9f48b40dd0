"""Adapters through the worker's gRPC server: loads go into empty slots only, unloads name the slot's
generation and wait for its sequences, rows naming another generation are refused (INVALID_ARGUMENT,
the rank stays healthy), and reading an adapter never holds up the steps."""

from __future__ import annotations

import asyncio
import threading

import grpc
import torch
from safetensors.torch import load_file

from proto import generate_pb2 as pb
from tests.worker.engine_scenario import generation_of
from tests.worker.server_harness import load_request, new_sequence, rpc_error
from worker.lora import reader


def file_bytes_as_float32(adapter_dir) -> int:
    """The adapter's A and B elements (one rank holds them all) x 4 bytes (the CPU's float32 pool)."""
    return 4 * sum(t.numel() for t in load_file(adapter_dir / "adapter_model.safetensors").values())


async def test_load_into_an_empty_slot_and_unload_by_generation(worker, tiny_adapters, caplog):
    caplog.set_level("INFO", logger="worker.server")
    stub = worker.stub
    reply = await stub.LoadAdapter(load_request(1, "r4_qv", tiny_adapters, generation=7))
    assert (reply.lora_rank, reply.alpha, reply.use_rslora) == (4, 8.0, False)
    assert list(reply.target_modules) == ["q_proj", "v_proj"]
    assert reply.load_ns > 0
    assert reply.weight_bytes == file_bytes_as_float32(tiny_adapters["r4_qv"])
    assert "Loading adapter weights into model: r4_qv" in caplog.messages
    assert (worker.runner.adapters[1].name, worker.runner.adapters[1].generation) == ("r4_qv", 7)

    # An occupied slot is never overwritten: the router unloads first. The weights read for the refused
    # load are good: they go to the host tier.
    r64_bytes = file_bytes_as_float32(tiny_adapters["r64_rs"])
    err = await rpc_error(stub.LoadAdapter(load_request(1, "r64_rs", tiny_adapters, generation=8)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "adapter 'r64_rs': slot 1 already holds adapter 'r4_qv' (generation 7); unload it first"
    )
    # A stale unload (another generation) leaves the slot as it is.
    err = await rpc_error(stub.UnloadAdapter(pb.UnloadAdapterRequest(slot=1, generation=6)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "unload of slot 1 generation 6: the slot holds adapter 'r4_qv' generation 7 (a stale unload?)"
    )
    assert worker.runner.adapters[1].generation == 7

    assert reply.tier == "disk" and reply.memory.pool_bytes_used >= reply.weight_bytes
    assert reply.memory.pool_bytes_total == worker.runner.slots.pool.bytes_total
    unloaded = await stub.UnloadAdapter(pb.UnloadAdapterRequest(slot=1, generation=7))
    assert 1 not in worker.runner.adapters
    # Its pool rows are NaN again (nothing can read them) and free; an unload keeps no copy of them (the
    # host tier holds only r64_rs's, from the refused load).
    assert worker.runner.slots.pool.filled_storage().isnan().all()
    assert unloaded.memory.pool_bytes_used == 0 and unloaded.memory.host_bytes_used == r64_bytes
    err = await rpc_error(stub.UnloadAdapter(pb.UnloadAdapterRequest(slot=1, generation=7)))
    assert err.details() == "unload of slot 1 generation 7: the slot is empty"

    reply = await stub.LoadAdapter(load_request(1, "r64_rs", tiny_adapters, generation=8))
    assert reply.tier == "host" and reply.memory.host_bytes_used == 0
    assert (reply.lora_rank, reply.alpha, reply.use_rslora) == (64, 16.0, True)
    assert len(reply.target_modules) == 7
    # An eviction (keep) puts its weights in the host tier; loaded again, it comes from there (a copy,
    # no file read), and the tier no longer holds it.
    evicted = await stub.UnloadAdapter(pb.UnloadAdapterRequest(slot=1, generation=8, keep=True))
    assert evicted.host_kept and evicted.memory.host_bytes_used == r64_bytes
    reply = await stub.LoadAdapter(load_request(2, "r64_rs", tiny_adapters, generation=9))
    assert reply.tier == "host" and reply.weight_bytes == r64_bytes and reply.memory.host_bytes_used == 0
    assert (worker.runner.adapters[2].name, worker.runner.adapters[2].generation) == ("r64_rs", 9)
    # Evicted again, then its name unloaded: the host copy is dropped.
    await stub.UnloadAdapter(pb.UnloadAdapterRequest(slot=2, generation=9, keep=True))
    dropped = await stub.DropHostCopy(pb.DropHostCopyRequest(adapter_id="r64_rs"))
    assert dropped.dropped and dropped.memory.host_bytes_used == 0
    assert not (await stub.DropHostCopy(pb.DropHostCopyRequest(adapter_id="r64_rs"))).dropped
    await stub.Health(pb.HealthRequest())


async def test_unload_is_refused_while_a_sequence_uses_the_slot(worker, tiny_adapters):
    stub = worker.stub
    await stub.LoadAdapter(load_request(2, "r8_all", tiny_adapters))
    seqs = [
        new_sequence(5, [3, 4], [0], slot=2),
        new_sequence(3, [5], [1], slot=2),
        new_sequence(4, [6], [2]),
    ]
    await stub.Prefill(pb.PrefillRequest(sequences=seqs))
    unload = pb.UnloadAdapterRequest(slot=2, generation=generation_of(2))
    err = await rpc_error(stub.UnloadAdapter(unload))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        f"unload of slot 2 generation {generation_of(2)}: adapter 'r8_all' is still used by running requests "
        "[3, 5]; release them first"
    )
    await stub.Decode(pb.DecodeRequest(request_ids=[5, 3, 4]))  # served with its weights as before
    await stub.Release(pb.ReleaseRequest(request_ids=[3, 5]))
    await stub.UnloadAdapter(unload)
    assert 2 not in worker.runner.adapters
    await stub.Decode(pb.DecodeRequest(request_ids=[4]))


async def test_rows_naming_another_generation_are_refused(worker, tiny_adapters):
    """A row whose slot holds another load generation (the slot was emptied or reloaded) fails the
    step before anything changes, as a prefill and as a newcomer of a join step."""
    stub = worker.stub
    await stub.LoadAdapter(load_request(1, "r4_qv", tiny_adapters, generation=7))
    await stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(1, [3, 4], [0], slot=1, generation=7)]))
    stale = new_sequence(2, [5, 6], [1], slot=1, generation=6)
    want = "request 2: slot 1 holds adapter 'r4_qv' generation 7, but the request expects generation 6"
    for call in (
        stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(3, [7], [2]), stale])),
        stub.Decode(pb.DecodeRequest(request_ids=[1], joining=[stale])),
    ):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == want
    assert set(worker.runner.sequences) == {1} and worker.runner.sequences[1].num_cached == 2
    await stub.Health(pb.HealthRequest())


async def test_steps_run_while_an_adapter_loads(worker, tiny_adapters, monkeypatch):
    """Reading and converting an adapter happen off the step thread (here, with no reader process, on
    the loader thread): decodes complete meanwhile; only the copy into the pool runs on the step thread."""
    stub = worker.stub
    await stub.Prefill(pb.PrefillRequest(sequences=[new_sequence(1, [3, 4, 5], [0, 1, 2])]))
    gate, reading, threads = threading.Event(), threading.Event(), {}
    read, prepare, place = reader.load_peft_adapter, reader.prepare_adapter, worker.runner.place_adapter

    def slow_read(*args):
        threads["read"] = threading.current_thread().name
        reading.set()
        assert gate.wait(10)
        return read(*args)

    def recorded(name, fn):
        def call(*args, **kwargs):
            threads[name] = threading.current_thread().name
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(reader, "load_peft_adapter", slow_read)
    monkeypatch.setattr(reader, "prepare_adapter", recorded("prepare", prepare))
    monkeypatch.setattr(worker.runner, "place_adapter", recorded("place", place))
    load = asyncio.ensure_future(stub.LoadAdapter(load_request(1, "r4_qv", tiny_adapters)))
    try:
        assert await asyncio.to_thread(reading.wait, 10)
        for _ in range(2):
            reply = await asyncio.wait_for(stub.Decode(pb.DecodeRequest(request_ids=[1])), timeout=10)
            assert [g.request_id for g in reply.generations] == [1]
        assert not load.done() and 1 not in worker.runner.adapters
    finally:
        gate.set()
    assert (await load).lora_rank == 4
    assert threads == {"read": "rank0-loader_0", "prepare": "rank0-loader_0", "place": "rank0-step_0"}
    reply = await stub.Decode(pb.DecodeRequest(request_ids=[1], joining=[new_sequence(2, [6], [3], slot=1)]))
    assert [g.request_id for g in reply.generations] == [2, 1]


async def test_a_failing_read_leaves_the_rank_healthy(worker, tiny_adapters, monkeypatch):
    """The adapter reader changes nothing the steps read: an unexpected error there is INTERNAL for that
    load alone."""

    def broken_read(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(reader, "load_peft_adapter", broken_read)
    err = await rpc_error(worker.stub.LoadAdapter(load_request(1, "r4_qv", tiny_adapters)))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "rank 0: adapter 'r4_qv': OSError: disk on fire"
    await worker.stub.Health(pb.HealthRequest())
    assert worker.runner.adapters == {}


def test_the_loader_thread_runs_torch_single_threaded():
    default = torch.get_num_threads()
    loader = reader.loader_thread(0)
    try:
        assert loader.submit(torch.get_num_threads).result() == 1
    finally:
        loader.shutdown()
    assert torch.get_num_threads() == default
    counts: list[int] = []
    fresh = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert counts == [default]  # the process default that new threads start with is unchanged
