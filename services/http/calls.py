"""HTTP requests through the gRPC ingress' own methods: one path for auth, routing, errors, metrics.

:class:`HttpCallContext` stands in for Ray Serve's ``RayServegRPCContext``: it hands the ingress
the request's ``Authorization`` header as gRPC metadata and keeps the status the ingress sets,
which :meth:`HttpCallContext.check` raises as an :class:`HttpError`.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Mapping

import grpc
from google.protobuf.message import Message
from steering.v1 import steering_pb2 as pb

from services.http.errors import HttpError


class HttpCallContext:
    """The subset of ``RayServegRPCContext`` the ingress uses."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        auth = headers.get("authorization")
        self._metadata = [("authorization", auth)] if auth is not None else []
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.trailing_metadata: list[tuple[str, bytes]] = []  # the google.rpc.Status details, as on gRPC

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: list[tuple[str, bytes]]) -> None:
        self.trailing_metadata = list(metadata)

    def check(self) -> None:
        if self.code != grpc.StatusCode.OK:
            raise HttpError.from_grpc(self.code, self.details)


class IngressCalls:
    """Call the ingress' RPC methods (``Generate``, ``GenerateStream``, ...) for HTTP requests."""

    def __init__(self, ingress: Any) -> None:
        self._ingress = ingress

    async def unary(self, rpc: str, request: Message, headers: Mapping[str, str]) -> Message:
        context = HttpCallContext(headers)
        response = await getattr(self._ingress, rpc)(request, context)
        context.check()
        return response

    async def stream(self, request: pb.GenerateRequest, headers: Mapping[str, str]) -> AsyncIterator[pb.GenerateStreamResponse]:
        """GenerateStream's messages; a failure (before or during the stream) raises HttpError."""
        context = HttpCallContext(headers)
        try:
            async with contextlib.aclosing(self._ingress.GenerateStream(request, context)) as messages:
                async for message in messages:
                    yield message
        except Exception:
            context.check()  # the ingress set the status and ended the stream: raise it as HTTP
            raise
        context.check()
