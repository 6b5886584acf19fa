"""The ingress deployment: serves the Steering and grpc.health.v1.Health services over gRPC, and
the HTTP API (services/http: OpenAI-compatible endpoints, a JSON mirror, the playground) through
Ray Serve's HTTP proxy, whose requests run through these same methods.

Ray Serve's gRPC proxy calls the method whose name equals the RPC's name. Each Steering RPC is
routed by ``request.model`` to that model's deployment (DeploymentHandle composition), or with
``ingress.colocate_models`` to the model served inside this replica (:mod:`services.local_models`,
called the same way), so clients need no Ray-specific metadata. Exceptions (ours, the backend's,
Ray's) become a gRPC status here, through :func:`services.errors.set_error` (code, message and
google.rpc.Status details); the replica never sees them escape.

This module imports no torch: the ingress stays small and starts fast (colocated models bring it).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from steering.v1 import steering_pb2 as pb

from sae_runtime.errors import InvalidArgument, NotFound
from services.errors import Unauthenticated, set_error
from services.local_models import LocalHandle
from services.metrics import ingress_metrics

#: Health service names this ingress answers for ("" = the whole server).
STEERING_SERVICE = "steering.v1.Steering"
HEALTH_PROBE_TIMEOUT_S = 5.0
#: How often a Health/Watch stream re-probes the models, in seconds.
WATCH_INTERVAL_S = 2.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _routed(rpc: str, response: type, method: str, *, timed: bool = True) -> Callable[..., Awaitable[Any]]:
    """The ingress method of a unary Steering RPC: routed by ``request.model`` to that model
    deployment's ``method`` (called with the request and, when ``timed``, the arrival time)."""

    async def handler(self: "SteeringIngress", request: Any, grpc_context: RayServegRPCContext) -> Any:
        def call(handle: DeploymentHandle, started: float) -> Awaitable[Any]:
            remote = getattr(handle, method).remote
            return remote(request, started) if timed else remote(request)

        return await self._unary(rpc, request.model, grpc_context, response, call)

    handler.__name__ = handler.__qualname__ = rpc
    handler.__doc__ = f"{rpc}: routed to the model deployment's ``{method}``."
    return handler


async def _stop(stream: Any) -> None:
    """End a model stream its reader abandoned: a colocated model's async generator is closed
    (its row is cancelled in the engine at once), a deployment's response generator cancelled."""
    if hasattr(stream, "aclose"):
        await stream.aclose()
    else:
        stream.cancel()


@serve.deployment
@serve.ingress()
class SteeringIngress:
    def __init__(
        self, models: dict[str, DeploymentHandle], auth: dict[str, Any] | None = None, http: dict[str, Any] | None = None,
        colocated: dict[str, tuple[Any, ...]] | None = None,
    ) -> None:
        """``models``: model name -> its deployment's handle; ``colocated``: model name ->
        ``ModelServer`` arguments, for models served inside this replica (:mod:`services.local_models`)."""
        # Handles are built where the app was bound, with that process' transport default; follow
        # this replica's RAY_SERVE_USE_GRPC_BY_DEFAULT (services.app.ray_env) for the model hop.
        grpc_data_plane = os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT") == "1"
        self._models: dict[str, Any] = {name: handle.options(_by_reference=not grpc_data_plane) for name, handle in models.items()}
        if colocated:
            from services.local_models import local_model_handles

            self._models |= local_model_handles(colocated)
        self._token = _resolve_token(auth or {})
        self._metrics = ingress_metrics()
        self._model_infos: dict[str, pb.ModelInfo] = {}
        self._http_options = http or {}

    def check_health(self) -> None:
        """Ray Serve's replica health check: fails when a model colocated here cannot serve (its
        engine process died), so Serve restarts this replica. Models in deployments of their own
        are checked by Serve in their own replicas."""
        for handle in self._models.values():
            if isinstance(handle, LocalHandle):
                handle.check_health()

    def __serve_build_asgi_app__(self) -> Any:
        """The HTTP API's app around this replica (Ray Serve calls it after ``__init__``)."""
        from services.http import build_http_app

        return build_http_app(self, **self._http_options)

    # -- plumbing --------------------------------------------------------------------------------
    def _authenticate(self, grpc_context: RayServegRPCContext) -> None:
        if self._token is None:
            return
        metadata = dict(grpc_context.invocation_metadata())
        given = metadata.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self._token.encode()):
            raise Unauthenticated("missing or wrong bearer token", field="authorization")

    def _handle(self, model: str) -> DeploymentHandle:
        available = ", ".join(sorted(self._models))
        if not model:
            raise InvalidArgument(f"name a model (available: {available})", field="model")
        if model not in self._models:
            raise NotFound(f"unknown model {model!r} (available: {available})", field="model")
        return self._models[model]

    def _model_tag(self, model: str) -> str:
        return model if model in self._models else "(unknown)"

    def _record(self, method: str, model: str, status: str, started: float) -> None:
        tag = self._model_tag(model)
        self._metrics.requests.inc(tags={"model": tag, "method": method, "status": status})
        self._metrics.latency_ms.observe((time.time() - started) * 1e3, tags={"model": tag, "method": method})

    async def _unary(
        self,
        method: str,
        model: str,
        grpc_context: RayServegRPCContext,
        empty: Callable[[], Any],
        call: Callable[[DeploymentHandle, float], Awaitable[Any]],
    ) -> Any:
        """Run ``call`` on the model's handle; on any error set the status and return ``empty()``."""
        started = time.time()
        status = "CANCELLED"  # unless it completes or fails below (a client that goes away)
        try:
            self._authenticate(grpc_context)
            response = await call(self._handle(model), started)
            status = "OK"
            return response
        except Exception as exc:  # noqa: BLE001 - every error becomes a status, in one place
            code, details = set_error(grpc_context, exc)
            status = code.name
            return empty()
        finally:
            self._record(method, model, status, started)

    # -- Steering --------------------------------------------------------------------------------
    Generate = _routed("Generate", pb.GenerateResponse, "generate")
    GenerateMultimodal = _routed("GenerateMultimodal", pb.GenerateResponse, "generate")
    GenerateImage = _routed("GenerateImage", pb.GenerateImageResponse, "generate_image")
    Encode = _routed("Encode", pb.EncodeResponse, "encode")
    SearchFeatures = _routed("SearchFeatures", pb.SearchFeaturesResponse, "search_features", timed=False)
    EvaluateSae = _routed("EvaluateSae", pb.EvaluateSaeResponse, "evaluate_sae")
    ComputeSteeringVector = _routed("ComputeSteeringVector", pb.ComputeSteeringVectorResponse, "compute_steering_vector")

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Relay the model deployment's token stream. An error sets the status and ends the stream
        (raised, because a stream that yielded nothing cannot carry a status otherwise)."""
        started = time.time()
        status = "CANCELLED"  # unless it completes or fails below
        stream = None
        try:
            self._authenticate(grpc_context)
            handle = self._handle(request.model).options(stream=True)
            stream = handle.generate_stream.remote(request, started)
            async for message in stream:
                yield message
            status = "OK"
        except Exception as exc:  # noqa: BLE001
            code, details = set_error(grpc_context, exc)
            status = code.name
            raise _StreamFailed(details) from None
        finally:
            if status == "CANCELLED" and stream is not None:
                await _stop(stream)  # the caller stopped reading: the model's row leaves now, not at GC
            self._record("GenerateStream", request.model, status, started)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext) -> pb.ListModelsResponse:
        async def call(_handle: DeploymentHandle, _started: float) -> pb.ListModelsResponse:
            missing = [name for name in self._models if name not in self._model_infos]
            infos = await asyncio.gather(*(self._model_info(name) for name in missing))
            self._model_infos.update((name, info) for name, info in zip(missing, infos) if info is not None)
            return pb.ListModelsResponse(models=[self._model_infos[name] for name in self._models if name in self._model_infos])

        first = next(iter(self._models))
        return await self._unary("ListModels", first, grpc_context, pb.ListModelsResponse, call)

    async def _model_info(self, name: str) -> pb.ModelInfo | None:
        """The model's info, or None when its deployment does not answer in time (failed to start,
        or restarting): ListModels then leaves it out instead of failing for every model."""
        try:
            return await asyncio.wait_for(self._models[name].model_info.remote(), HEALTH_PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - an unavailable model is left out; health reports it NOT_SERVING
            return None

    # -- grpc.health.v1.Health -------------------------------------------------------------------
    async def _probe(self, models: list[str]) -> int:
        async def one(name: str) -> bool:
            try:
                return bool(await asyncio.wait_for(self._models[name].ready.remote(), HEALTH_PROBE_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - an unreachable model is NOT_SERVING, not an error
                return False

        results = await asyncio.gather(*(one(name) for name in models))
        return _SERVING if all(results) else _NOT_SERVING

    def _models_of_service(self, service: str) -> list[str] | None:
        if service in ("", STEERING_SERVICE):
            return list(self._models)
        if service in self._models:
            return [service]
        return None

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        """SERVING when every model deployment answers (service "" or "steering.v1.Steering"), or the
        named model's deployment does (service = a model name); NOT_FOUND for other services."""
        models = self._models_of_service(request.service)
        if models is None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return health_pb2.HealthCheckResponse(status=await self._probe(models))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status, then each change (probed every ``WATCH_INTERVAL_S``), as the health
        protocol asks; an unknown service gets SERVICE_UNKNOWN. The stream runs until the client
        leaves or the proxy's ``request_timeout_s`` ends it (clients then watch again)."""
        models = self._models_of_service(request.service)
        if models is None:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        async for status in status_changes(lambda: self._probe(models), WATCH_INTERVAL_S):
            yield health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, grpc_context: RayServegRPCContext) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        overall = await self._probe(list(self._models))
        response.statuses[""].status = overall
        response.statuses[STEERING_SERVICE].status = overall
        for name in self._models:
            response.statuses[name].status = await self._probe([name])
        return response


async def status_changes(probe: Callable[[], Awaitable[int]], interval_s: float) -> AsyncIterator[int]:
    """``probe()``'s first result, then every result that differs from the last one sent."""
    last = None
    while True:
        status = await probe()
        if status != last:
            yield status
            last = status
        await asyncio.sleep(interval_s)


class _StreamFailed(Exception):
    """Raised to end a failed stream; its status was set on the gRPC context."""


def _resolve_token(auth: dict[str, Any]) -> str | None:
    if auth.get("bearer_token"):
        return str(auth["bearer_token"])
    env = auth.get("bearer_token_env")
    if env:
        token = os.environ.get(env)
        if not token:
            raise RuntimeError(f"auth.bearer_token_env names {env!r}, which is not set in the ingress replica")
        return token
    return None
