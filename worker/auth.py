"""The worker token: a rank that serves gRPC over TCP (a node other than 0 in a multi-node group) answers
only calls that carry the group's shared secret.

The router sends it as the metadata `authorization: Bearer <WORKER_TOKEN>` on every call (router/client.py
writes the same format; the two sides share no module). Anything else is refused with UNAUTHENTICATED
before it reaches the servicer. Unix-socket ranks need no token: their socket is owner-only (0600).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

METADATA_KEY = "authorization"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every RPC whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the worker token is empty")
        self._expected = f"Bearer {token}".encode()
        self._refusal = grpc.unary_unary_rpc_method_handler(_refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get(METADATA_KEY, "")
        given_bytes = given if isinstance(given, bytes) else str(given).encode()
        # Constant-time comparison: the answer time must not tell how much of a guess was right.
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(handler_call_details)
        return self._refusal


async def _refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token (WORKER_TOKEN)")
