"""The one place where exceptions become gRPC status codes, details and rich error details.

sae_runtime's typed errors carry the status name (``SaeRuntimeError.status``) and the request
field; Ray wraps exceptions raised in another replica (RayTaskError, whose ``cause`` is the
original). Anything unexpected becomes INTERNAL with the exception's type and message, so a client
always gets a status and a replica never dies of a request.

Besides the code and the message, every error carries a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (the gRPC richer error model, as Google's API design guide
defines it), holding one detail message by code:

| code | detail |
|---|---|
| INVALID_ARGUMENT, UNAUTHENTICATED | ``google.rpc.BadRequest`` with one ``FieldViolation{field, description}`` |
| NOT_FOUND | ``google.rpc.ResourceInfo{resource_type, resource_name, description}`` |
| RESOURCE_EXHAUSTED | ``google.rpc.QuotaFailure`` with one ``Violation{subject, description}`` |
| FAILED_PRECONDITION | ``google.rpc.PreconditionFailure`` with one ``Violation{type: "FILE", subject, description}`` |

``field`` is the request field path as Google's guide writes it (``plan.edits[0].latents``);
``resource_type`` is its last name (``model``, ``sae``, ``labels``), ``resource_name`` the quoted
unknown value of the message where there is one. Errors with no field carry no detail.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from sae_runtime.errors import SaeRuntimeError, Unavailable  # noqa: F401 - Unavailable: services raise it too

#: How the details of a RESOURCE_EXHAUSTED status from back-pressure start (HTTP tells it from a
#: request over a configured limit: 429 against 413).
OVERLOADED = "server overloaded"


class Unauthenticated(SaeRuntimeError):
    """The service requires a bearer token and the request had none, or a wrong one."""

    status = "UNAUTHENTICATED"


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


#: The trailer key of the serialized google.rpc.Status (grpc-status-details-bin).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
_QUOTED = re.compile(r"'([^']*)'")


def _detail(code: grpc.StatusCode, field: str, message: str) -> Any | None:
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
        return error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]
        )
    if code == grpc.StatusCode.NOT_FOUND:
        quoted = _QUOTED.search(message)
        return error_details_pb2.ResourceInfo(
            resource_type=re.sub(r"\[\d+\]", "", field).rsplit(".", 1)[-1],
            resource_name=quoted.group(1) if quoted else "",
            description=message,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=field, description=message)]
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return error_details_pb2.PreconditionFailure(
            violations=[error_details_pb2.PreconditionFailure.Violation(type="FILE", subject=field, description=message)]
        )
    return None


def rich_status(exc: BaseException) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    """(code, details, google.rpc.Status) for ``exc``; the Status holds the detail message of the
    table above when the error names a field."""
    code, details = grpc_status(exc)
    status = status_pb2.Status(code=code.value[0], message=details)
    original = unwrap(exc)
    field = getattr(original, "field", None) if isinstance(original, SaeRuntimeError) else None
    if field:
        detail = _detail(code, field, original.message)
        if detail is not None:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
    return code, details, status


def set_error(grpc_context: Any, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Set code, details and the ``grpc-status-details-bin`` trailer of ``exc`` on a (Ray Serve)
    gRPC context; returns (code, details)."""
    code, details, status = rich_status(exc)
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    grpc_context.set_trailing_metadata([(STATUS_DETAILS_KEY, status.SerializeToString())])
    return code, details
