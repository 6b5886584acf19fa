"""Guards in front of the HTTP API's routes: the body cap (the counterpart of the gRPC proxy's
message cap) and JSON-only request bodies."""

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


#: Content types a browser may send cross-origin without a CORS preflight ("simple requests").
SIMPLE_CONTENT_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})


class JsonBodies:
    """ASGI middleware: refuse request bodies sent as a form or plain text with 415. Bodies are JSON;
    refusing the types a web page may POST to another origin without a CORS preflight means a page
    on another site cannot make a visitor's browser run requests on a service it can reach (the API
    sends no CORS headers, so the preflight fails)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            kind = dict(scope.get("headers") or ()).get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
            if kind in SIMPLE_CONTENT_TYPES:
                message = f"content-type: send the body as application/json, not {kind}"
                err = HttpError(415, "INVALID_ARGUMENT", message, "content-type")
                await JSONResponse(err.body(), status_code=415)(scope, receive, send)
                return
        await self.app(scope, receive, send)
