"""The one place where exceptions become gRPC status codes.

sae_runtime's typed errors carry the status name (``SaeRuntimeError.status``) and the request
field; Ray wraps exceptions raised in another replica (RayTaskError, whose ``cause`` is the
original). Anything unexpected becomes INTERNAL with the exception's type and message, so a client
always gets a status and a replica never dies of a request.
"""

from __future__ import annotations

import asyncio

import grpc

from sae_runtime.errors import SaeRuntimeError

#: How the details of a RESOURCE_EXHAUSTED status from back-pressure start (HTTP tells it from a
#: request over a configured limit: 429 against 413).
OVERLOADED = "server overloaded"


class Unauthenticated(SaeRuntimeError):
    """The service requires a bearer token and the request had none, or a wrong one."""

    status = "UNAUTHENTICATED"


class Unavailable(SaeRuntimeError):
    """A model deployment cannot take requests right now."""

    status = "UNAVAILABLE"


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError.cause, possibly nested)."""
    seen = 0
    while seen < 8:
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            return exc
        exc, seen = cause, seen + 1
    return exc


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to (status code, details). Details name the request field when known."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    original = unwrap(exc)
    if isinstance(original, SaeRuntimeError):
        code = getattr(grpc.StatusCode, original.status, grpc.StatusCode.INTERNAL)
        return code, str(original)
    if isinstance(original, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{OVERLOADED}: {original.message}"
    if isinstance(original, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, original.message
    if isinstance(original, (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)):
        # The replica running the request died (crash, OOM kill, node loss); Serve replaces it.
        return grpc.StatusCode.UNAVAILABLE, f"the model replica became unavailable ({type(original).__name__}); retry"
    if isinstance(original, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request did not finish in time"
    if isinstance(original, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(original).__name__}: {original}"[:2000]
