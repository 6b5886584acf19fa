"""HTTP errors: a gRPC status (from :func:`services.errors.grpc_status`, via the ingress) as an HTTP
status and a JSON body that names the request field.

The body has OpenAI's error shape, so OpenAI clients surface it as they would OpenAI's own errors
(``err.status_code``, ``err.code``, ``err.param``)::

    {"error": {"code": "INVALID_ARGUMENT", "message": "plan.edits[0].latents: latent 99 out of
     range [0, 64)", "param": "plan.edits[0].latents", "type": "invalid_request_error"}}

Status mapping (Google's gRPC <-> HTTP table, with a configured limit as 413 and an overloaded
server as 429): INVALID_ARGUMENT / FAILED_PRECONDITION 400, UNAUTHENTICATED 401, NOT_FOUND 404,
RESOURCE_EXHAUSTED 413 (a request over a limit) or 429 (server overloaded), CANCELLED 499,
INTERNAL 500, UNAVAILABLE 503, DEADLINE_EXCEEDED 504.
"""

from __future__ import annotations

import re
from typing import Any

import grpc

from services.errors import OVERLOADED

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}

#: gRPC details name the field first: "plan.edits[0].latents: latent 99 out of range [0, 64)".
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*): ")


class HttpError(Exception):
    """An error answered as ``status`` with the JSON body of :meth:`body`."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, details: str) -> "HttpError":
        status = _HTTP_STATUS.get(code, 500)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(OVERLOADED):
            status = 429
        match = _FIELD_PREFIX.match(details or "")
        return cls(status, code.name, details, match.group(1) if match else None)

    @classmethod
    def invalid(cls, param: str, message: str) -> "HttpError":
        """A malformed HTTP request (JSON, an OpenAI field): 400 INVALID_ARGUMENT naming ``param``."""
        return cls(400, "INVALID_ARGUMENT", f"{param}: {message}" if param else message, param or None)

    def renamed(self, rename) -> "HttpError":
        """This error with its field renamed by ``rename`` (proto name -> the HTTP request's name)."""
        if not self.param:
            return self
        new = rename(self.param)
        message = new + self.message[len(self.param) :] if self.message.startswith(self.param) else self.message
        return HttpError(self.status, self.code, message, new)

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"code": self.code, "message": self.message, "param": self.param, "type": kind}}
