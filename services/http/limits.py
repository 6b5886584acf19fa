"""Request body cap for the HTTP API (the counterpart of the gRPC proxy's message cap)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.http.errors import HttpError


class BodyTooLarge(HTTPException):
    """A request body over the cap. An HTTPException, so FastAPI's body parsing re-raises it as is."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"body: the request body exceeds the limit of {max_bytes} bytes")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (by Content-Length up front, or counted as
    they arrive) with 413, before any route parses them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = HttpError(413, "RESOURCE_EXHAUSTED", str(BodyTooLarge(self.max_bytes).detail), "body")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)
