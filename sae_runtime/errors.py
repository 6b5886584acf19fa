"""Typed errors raised at the edge of sae_runtime.

Each error names the request field (or file and tensor) it is about, so the service can map it
to a gRPC status with a message a client can act on. The mapping lives in one place in
``services`` and reads only :attr:`SaeRuntimeError.status`.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class SaeRuntimeError(Exception):
    """Base class. ``field`` is the dotted request field (or file path) the error is about."""

    #: Name of the gRPC status code this error maps to (kept as a string: no grpc import here).
    status: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self) -> tuple:
        # Pickled with its field (the engine process sends errors to the replica).
        return _rebuild_error, (type(self), self.message, self.field)


def _rebuild_error(cls: type[SaeRuntimeError], message: str, field: str | None) -> SaeRuntimeError:
    return cls(message, field=field)


class NotFound(SaeRuntimeError):
    """An unknown model, SAE, label or hook site was named."""

    status = "NOT_FOUND"


class InvalidArgument(SaeRuntimeError):
    """A value is out of range, not finite, of the wrong shape or otherwise malformed."""

    status = "INVALID_ARGUMENT"


class TooLarge(SaeRuntimeError):
    """A request exceeds a configured limit (tokens, edits, image bytes, batch)."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(SaeRuntimeError):
    """The request could not finish before its deadline."""

    status = "DEADLINE_EXCEEDED"


class Unavailable(SaeRuntimeError):
    """A model (its replica or engine process) cannot take requests right now."""

    status = "UNAVAILABLE"


class FormatError(SaeRuntimeError):
    """A file on disk is missing, corrupt, or does not match its declared format.

    ``field`` holds the file path; the message names the tensor or key at fault.
    """

    status = "FAILED_PRECONDITION"


def require_finite(value: float, field: str) -> float:
    """Return ``value`` as float, raising InvalidArgument naming ``field`` for NaN or +-inf."""
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise InvalidArgument(f"must be a finite number, got {value!r}", field=field)
    return v


class Cancelled(SaeRuntimeError):
    """The caller cancelled the request (or went away) before it finished."""

    status = "CANCELLED"


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """A command line's exit code: ``main(argv)``, or 2 with ``error: <field>: <message>`` on stderr
    when it raises a :class:`SaeRuntimeError` (bad arguments or files; no traceback)."""
    try:
        return main(argv)
    except SaeRuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
