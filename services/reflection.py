"""gRPC server reflection ``grpc.reflection.v1`` beside Ray Serve's built-in ``v1alpha``.

Ray Serve's proxy serves ``grpc.reflection.v1alpha.ServerReflection`` only (``enable_reflection``),
so a client that speaks only v1 (grpcurl >= 1.9 tries v1 first; Postman, grpcui, newer grpc
toolchains) would get UNIMPLEMENTED. The two protocols have the same messages with the same field
numbers under different package names, so v1 is served by grpcio-reflection's own v1alpha
servicer under the v1 method name: the bytes on the wire are identical.

:func:`add_ReflectionV1Servicer_to_server` is listed in the proxy's ``grpc_servicer_functions``
(services.config.GRPC_SERVICER_FUNCTIONS). It registers the service as one of the proxy's
passthrough services (run on the proxy itself, like Ray's v1alpha reflection) instead of being
routed to a deployment. The services it lists are those registered on the proxy, as Ray's
v1alpha reflection lists them, plus both reflection services.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
METHOD = "ServerReflectionInfo"
_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
_RAY_SERVE_API = "ray.serve.RayServeAPIService"


def _registered_services(server: Any) -> list[str]:
    """Full names of the services registered on ``server`` (a grpc.aio server or Ray's subclass)."""
    names: set[str] = set()
    for handlers in getattr(server, "generic_rpc_handlers", ()):
        for handler in handlers:
            names.update(key.split("/")[1] for key in getattr(handler, "_method_handlers", {}))
    names.discard(_RAY_SERVE_API)
    return sorted(names | {SERVICE_NAME, _V1ALPHA})


def add_ReflectionV1Servicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - grpc naming
    """Serve ``grpc.reflection.v1.ServerReflection`` on ``server``; ``servicer`` (Ray passes a
    placeholder) is ignored. The listed services are read when the first call arrives, after every
    servicer function has registered."""
    state: dict[str, ReflectionServicer] = {}

    async def info(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if "servicer" not in state:
            state["servicer"] = ReflectionServicer(_registered_services(server))
        async for response in state["servicer"].ServerReflectionInfo(requests, context):
            yield response

    if hasattr(server, "add_passthrough_service"):  # Ray Serve's proxy: run here, not on a replica
        server.add_passthrough_service(SERVICE_NAME)
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        METHOD: grpc.stream_stream_rpc_method_handler(
            info,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    })
    server.add_generic_rpc_handlers((handler,))
