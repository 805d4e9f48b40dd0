"""The sharded gRPC client: every RPC goes to every tensor-parallel rank at once; rank 0's reply is used.

Ranks run each step in lockstep, so a call succeeds only when every rank answers. The first error from any
rank fails the call at once (the other ranks' calls are cancelled) and is raised as `WorkerError`
naming the rank, so a broken rank never leaves a request waiting on the others.

The ranks on this node are reached over unix sockets; in a multi-node group, those of the other nodes over
TCP, with the group's token on every call as `authorization: Bearer <token>` metadata (worker/auth.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from proto import generate_pb2 as pb
from proto.generate_pb2_grpc import TextGenerationServiceStub

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    # Prompt logprobs of long prompts exceed gRPC's 4 MiB default.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Workers take minutes to start; reconnect every second instead of backing off to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class WorkerError(Exception):
    """A rank failed an RPC (or could not be reached)."""

    def __init__(self, method: str, rank: int, detail: str, code: grpc.StatusCode | None = None):
        super().__init__(f"{method} failed on rank {rank}: {detail}")
        self.method = method
        self.rank = rank
        self.detail = detail
        self.code = code


class ShardedClient:
    def __init__(self, uds_paths: Sequence[str], tcp_addresses: Sequence[str] = (), token: str | None = None):
        """Ranks 0..len(uds_paths)-1 on unix sockets, then the ranks at `tcp_addresses` (`host:port`)."""
        if not uds_paths and not tcp_addresses:
            raise ValueError("at least one worker rank is needed")
        self.uds_paths = list(uds_paths)
        self.targets = [f"unix://{path}" for path in uds_paths] + list(tcp_addresses)
        self._channels = [grpc.aio.insecure_channel(t, options=_CHANNEL_OPTIONS) for t in self.targets]
        self._stubs = [TextGenerationServiceStub(ch) for ch in self._channels]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Send `request` to every rank; return rank 0's reply, or raise the first rank error."""
        calls: list[Callable[..., Awaitable[Any]]] = [getattr(stub, method) for stub in self._stubs]
        tasks = [
            asyncio.ensure_future(call(request, timeout=timeout, metadata=self._metadata)) for call in calls
        ]
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise self._error(method, tasks.index(task), task.exception())
            return tasks[0].result()
        finally:
            for task in tasks:
                task.cancel()

    async def _call_each(
        self, method: str, request: Any, ranks: Sequence[int], timeout: float | None
    ) -> list[Any]:
        """Send `request` to `ranks` and wait for all of them: each one's reply or WorkerError."""

        async def one(rank: int) -> Any:
            call = getattr(self._stubs[rank], method)
            try:
                return await call(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                return self._error(method, rank, e)

        return list(await asyncio.gather(*(one(rank) for rank in ranks)))

    @staticmethod
    def _error(method: str, rank: int, exc: BaseException) -> WorkerError:
        if isinstance(exc, grpc.aio.AioRpcError):
            detail = exc.details() or exc.code().name
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = f"{exc.code().name}: {detail}"
            return WorkerError(method, rank, detail, exc.code())
        return WorkerError(method, rank, repr(exc))

    # ---- RPCs -----------------------------------------------------------------------------------

    async def info(self) -> pb.InfoResponse:
        return await self._call("Info", pb.InfoRequest())

    async def health(self, timeout: float | None = None) -> None:
        await self._call("Health", pb.HealthRequest(), timeout=timeout)

    async def wait_ready(self, timeout: float, poll_s: float = 0.2) -> None:
        """Poll Health until every rank answers; raise TimeoutError with the last failure after `timeout`.

        A rank that refuses the worker token (UNAUTHENTICATED) will never answer: its WorkerError is raised
        at once."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                await self.health(timeout=max(min(remaining, 5.0), 0.1))
                return
            except WorkerError as e:
                if e.code == grpc.StatusCode.UNAUTHENTICATED:
                    raise
                if time.monotonic() + poll_s >= deadline:
                    raise TimeoutError(f"workers not ready after {timeout:.0f} s ({e})") from None
                log.debug("waiting for workers: %s", e)
            await asyncio.sleep(poll_s)

    async def load_adapter(
        self, slot: int, adapter_id: str, path: str, generation: int, timeout: float | None = None
    ) -> list[pb.LoadAdapterResponse | WorkerError]:
        """Load on every rank; each rank's reply or error, in rank order (a rollback needs to know which
        ranks hold the adapter, so no call is cancelled when another fails)."""
        request = pb.LoadAdapterRequest(slot=slot, adapter_id=adapter_id, path=path, generation=generation)
        return await self._call_each("LoadAdapter", request, range(self.world_size), timeout)

    async def unload_adapter(
        self,
        slot: int,
        generation: int,
        ranks: Sequence[int] | None = None,
        timeout: float | None = None,
        keep: bool = False,
    ) -> list[pb.UnloadAdapterResponse | WorkerError]:
        """Empty `slot` (if it holds load `generation`) on `ranks` (default all), keeping its weights in
        the host tier with `keep`. Each rank's reply or error."""
        ranks = range(self.world_size) if ranks is None else ranks
        request = pb.UnloadAdapterRequest(slot=slot, generation=generation, keep=keep)
        return await self._call_each("UnloadAdapter", request, ranks, timeout)

    async def drop_host_copy(
        self, adapter_id: str, timeout: float | None = None
    ) -> list[pb.DropHostCopyResponse | WorkerError]:
        """Free every rank's host-tier copy of `adapter_id`. Each rank's reply or error."""
        request = pb.DropHostCopyRequest(adapter_id=adapter_id)
        return await self._call_each("DropHostCopy", request, range(self.world_size), timeout)

    async def prefill(self, sequences: Sequence[pb.NewSequence]) -> pb.StepResponse:
        return await self._call("Prefill", pb.PrefillRequest(sequences=sequences))

    async def decode(
        self, request_ids: Sequence[int], joining: Sequence[pb.NewSequence] = ()
    ) -> pb.StepResponse:
        request = pb.DecodeRequest(request_ids=request_ids, joining=joining)
        return await self._call("Decode", request)

    async def release(self, request_ids: Sequence[int], timeout: float | None = None) -> None:
        await self._call("Release", pb.ReleaseRequest(request_ids=request_ids), timeout=timeout)

    async def clear_cache(self) -> None:
        await self._call("ClearCache", pb.ClearCacheRequest())
