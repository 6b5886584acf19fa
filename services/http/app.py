"""The HTTP API's FastAPI app, built in each ingress replica around that replica's ingress object.

Routes (all JSON; streams are server-sent events):

- ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI-compatible
  (services/http/openai_compat.py);
- ``POST /v1/steering/<Rpc>`` for every Steering RPC: the request and response bodies are the
  proto messages in protobuf's JSON mapping; ``GenerateStream`` answers one SSE event per message;
- ``GET /openapi.json`` (and ``/docs``), ``GET /`` the steering playground (services/static).

Every request runs through the gRPC ingress' own methods (:class:`IngressCalls`), so it gets the
same bearer-token check, routing, validation, errors and metrics as over gRPC. Bodies larger than
``max_body_bytes`` are refused with 413 before they are parsed, forms and plain text with 415.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from steering.v1 import steering_pb2 as pb

from services.http import openai_compat as oa
from services.http import protojson
from services.http.calls import IngressCalls
from services.http.errors import HttpError
from services.http.limits import BodyLimit, BodyTooLarge, JsonBodies

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: Unary RPCs of the JSON mirror: name -> (request type, response type).
UNARY_RPCS = {
    "Generate": (pb.GenerateRequest, pb.GenerateResponse),
    "GenerateMultimodal": (pb.GenerateMultimodalRequest, pb.GenerateResponse),
    "GenerateImage": (pb.GenerateImageRequest, pb.GenerateImageResponse),
    "Encode": (pb.EncodeRequest, pb.EncodeResponse),
    "ListModels": (pb.ListModelsRequest, pb.ListModelsResponse),
    "SearchFeatures": (pb.SearchFeaturesRequest, pb.SearchFeaturesResponse),
    "EvaluateSae": (pb.EvaluateSaeRequest, pb.EvaluateSaeResponse),
    "ComputeSteeringVector": (pb.ComputeSteeringVectorRequest, pb.ComputeSteeringVectorResponse),
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event carrying ``data`` as JSON (or a literal string)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


#: How pydantic names a union's member in an error location ("str", "list[str]", ...).
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


def field_path(loc: tuple | list) -> str:
    """A pydantic error location as the request's field path: ``("body", "messages", 0, "role")``
    -> ``messages[0].role``; a union's member tag and what follows it are left out."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p == "body" and not parts:
            continue
        elif _UNION_MEMBER.match(str(p)):
            break
        else:
            parts.append(f".{p}")
    return "".join(parts).lstrip(".") or "body"


def error_response(err: HttpError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HttpError.invalid("body", f"not valid JSON: {err}") from None


async def merged(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, item) from several async iterators as items arrive; the first error ends all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def started(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """``events`` with its first item already awaited, so an error before the stream begins is
    raised here (and answered with its HTTP status) instead of inside a 200 response."""
    first = await anext(events)

    async def replay() -> AsyncIterator[str]:
        async with contextlib.aclosing(events):  # closed with the response: the model's row leaves at once
            yield first
            async for event in events:
                yield event

    return replay()


def build_http_app(ingress: Any, *, max_body_bytes: int = 64 << 20) -> FastAPI:
    """The FastAPI app serving ``ingress`` (a SteeringIngress replica) over HTTP."""
    calls = IngressCalls(ingress)
    app = FastAPI(
        title="SAE steering service",
        description="The Steering API (protos/steering/v1/steering.proto) over HTTP: a JSON mirror of every RPC "
        "and OpenAI-compatible completions with a `steering` extension.",
        version="1",
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(JsonBodies)

    @app.exception_handler(HttpError)
    async def _http_error(_: Request, err: HttpError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        return error_response(HttpError.invalid(field_path(first.get("loc", ())), first.get("msg", "invalid")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_exception(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if isinstance(err, BodyTooLarge):
            return error_response(HttpError(413, "RESOURCE_EXHAUSTED", str(err.detail), "body"))
        code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(err.status_code, "INVALID_ARGUMENT")
        return error_response(HttpError(err.status_code, code, str(err.detail)))

    # -- JSON mirror ---------------------------------------------------------------------------
    def add_unary(rpc: str, request_type: type, response_type: type) -> None:
        async def endpoint(request: Request) -> JSONResponse:
            message = protojson.parse(await read_json(request), request_type)
            return JSONResponse(protojson.dump(await calls.unary(rpc, message, request.headers)))

        app.add_api_route(
            f"/v1/steering/{rpc}", endpoint, methods=["POST"], name=rpc, tags=["steering.v1.Steering"],
            summary=f"The {rpc} RPC: body and response in protobuf's JSON mapping",
            openapi_extra=_openapi_body(request_type, response_type),
        )

    for rpc, (request_type, response_type) in UNARY_RPCS.items():
        add_unary(rpc, request_type, response_type)

    @app.post(
        "/v1/steering/GenerateStream", tags=["steering.v1.Steering"], response_class=StreamingResponse,
        summary="The GenerateStream RPC: one server-sent event per GenerateStreamResponse (event `error` on failure)",
        openapi_extra=_openapi_body(pb.GenerateRequest, pb.GenerateStreamResponse, stream=True),
    )
    async def generate_stream(request: Request) -> StreamingResponse:
        message = protojson.parse(await read_json(request), pb.GenerateRequest)

        async def events() -> AsyncIterator[str]:
            sent = False
            try:
                async with contextlib.aclosing(calls.stream(message, request.headers)) as items:
                    async for item in items:
                        sent = True
                        yield sse(protojson.dump(item))
            except HttpError as err:
                if not sent:
                    raise
                yield sse(err.body(), event="error")

        return StreamingResponse(await started(events()), media_type="text/event-stream", headers=SSE_HEADERS)

    # -- OpenAI-compatible ---------------------------------------------------------------------
    @app.get("/v1/models", tags=["openai"])
    async def list_models(request: Request) -> dict[str, Any]:
        models = await calls.unary("ListModels", pb.ListModelsRequest(), request.headers)
        return {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": 0, "owned_by": "sae-steering", "steering": protojson.dump(m)}
                for m in models.models
            ],
        }

    async def openai_call(body: oa.CompletionBody | oa.ChatBody, chat: bool, request: Request):
        rename = oa.field_renamer(chat)
        try:
            requests = oa.chat_requests(body) if chat else oa.completion_requests(body)
            if body.stream:
                events = await started(openai_events(body, chat, requests, request))
                return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
            responses = await asyncio.gather(*(calls.unary(_rpc_of(r), r, request.headers) for r in requests))
        except HttpError as err:
            return error_response(err.renamed(rename))
        return (oa.chat_response if chat else oa.completion_response)(body, list(responses))

    async def openai_events(body, chat: bool, requests: list, request: Request) -> AsyncIterator[str]:
        """OpenAI chunks for ``requests`` (one per choice); an error before the first chunk is raised
        (an HTTP status), a later one ends the stream with an ``error`` object, as OpenAI does."""
        writer = oa.ChunkWriter(body, chat)
        streamed = [i for i, r in enumerate(requests) if isinstance(r, pb.GenerateRequest)]
        whole = [i for i in range(len(requests)) if i not in streamed]
        sent = False
        try:
            async for k, message in merged([calls.stream(requests[i], request.headers) for i in streamed]):
                if not sent:
                    sent = True
                    for chunk in (writer.opening(i) for i in streamed):
                        if chunk is not None:
                            yield sse(chunk)
                index = streamed[k]
                yield sse(writer.final(index, message.final) if message.HasField("final") else writer.token(index, message))
            for i in whole:
                response = await calls.unary(_rpc_of(requests[i]), requests[i], request.headers)
                sent = True
                for chunk in writer.whole(i, response):
                    yield sse(chunk)
        except HttpError as err:
            if not sent:
                raise
            yield sse(err.renamed(oa.field_renamer(chat)).body())
            return
        yield sse("[DONE]")

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: oa.CompletionBody, request: Request):
        return await openai_call(body, False, request)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: oa.ChatBody, request: Request):
        return await openai_call(body, True, request)

    # -- playground ----------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            descriptors = [t.DESCRIPTOR for pair in UNARY_RPCS.values() for t in pair] + [pb.GenerateStreamResponse.DESCRIPTOR]
            schema.setdefault("components", {}).setdefault("schemas", {}).update(protojson.json_schemas(*descriptors))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _rpc_of(request: pb.GenerateRequest | pb.GenerateMultimodalRequest) -> str:
    return "GenerateMultimodal" if isinstance(request, pb.GenerateMultimodalRequest) else "Generate"


def _openapi_body(request_type: type, response_type: type, stream: bool = False) -> dict[str, Any]:
    def ref(t: type) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{t.DESCRIPTOR.full_name}"}

    media = "text/event-stream" if stream else "application/json"
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request_type)}}},
        "responses": {
            "200": {"description": f"{response_type.DESCRIPTOR.name} (proto JSON)", "content": {media: {"schema": ref(response_type)}}}
        },
    }
