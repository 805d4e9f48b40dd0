"""Shared parts of the worker gRPC server tests: a tiny-model config, stub helpers, request builders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pb_grpc
from tests.worker.engine_scenario import generation_of
from worker.config import WorkerConfig
from worker.runner import ModelRunner

BLOCK_SIZE = 4
NUM_BLOCKS = 64
ADAPTERS = ("r4_qv", "r8_all", "r64_rs")  # slots 1, 2, 3


def worker_config(model_dir: Path, **overrides) -> WorkerConfig:
    kwargs = dict(
        model_dir=model_dir,
        dtype="float32",
        block_size=BLOCK_SIZE,
        num_blocks=NUM_BLOCKS,
        max_adapters=len(ADAPTERS),
        max_lora_rank=64,
    )
    return WorkerConfig(**{**kwargs, **overrides})


@dataclass
class Worker:
    stub: pb_grpc.TextGenerationServiceStub
    runner: ModelRunner


def load_request(slot: int, name: str, tiny_adapters, generation: int | None = None) -> pb.LoadAdapterRequest:
    """Load adapter `name` into `slot`, as `generation` (default: `generation_of(slot)`)."""
    generation = generation_of(slot) if generation is None else generation
    return pb.LoadAdapterRequest(
        slot=slot, adapter_id=name, path=str(tiny_adapters[name]), generation=generation
    )


async def load_adapters(stub, tiny_adapters):
    for slot, name in enumerate(ADAPTERS, start=1):
        await stub.LoadAdapter(load_request(slot, name, tiny_adapters))


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def new_sequence(
    rid: int, tokens: list[int], blocks: list[int], slot: int = 0, generation: int | None = None, **params
) -> pb.NewSequence:
    """A NewSequence on adapter `slot`, expecting load `generation` there (default: `generation_of(slot)`)."""
    full = {"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, **params}
    return pb.NewSequence(
        request_id=rid,
        token_ids=tokens,
        block_table=blocks,
        lora_slot=slot,
        adapter_generation=generation_of(slot) if generation is None else generation,
        parameters=pb.SamplingParameters(**full),
    )


def as_tuples(outputs) -> list[tuple]:
    return [
        (
            o.request_id,
            o.token_id,
            o.logprob,
            list(o.top_token_ids),
            list(o.top_logprobs),
            list(o.prompt_logprobs),
        )
        for o in outputs
    ]
