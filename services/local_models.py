"""Models served inside the ingress replica (``ingress.colocate_models``), called like their
DeploymentHandles, so the ingress' routing code is the same either way.

Colocated, a request makes one Ray Serve hop (proxy -> ingress) instead of two (proxy -> ingress
-> model deployment), and the replica needs no second serialisation of the request and response;
the models then scale with the ingress' replicas. ``ModelServer``'s methods run exactly as in
their own deployment: async ones on this replica's event loop, sync ones on a worker thread (Ray
Serve runs a deployment's sync methods on its thread pool), the engine on its own thread.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable


class LocalHandle:
    """``handle.method.remote(*args)`` (an awaitable, or with ``options(stream=True)`` an async
    iterator) on a ``ModelServer`` object of this process."""

    def __init__(self, server: Any, stream: bool = False) -> None:
        self._server = server
        self._stream = stream

    def check_health(self) -> None:
        """The model's health check, run by the ingress' own (a colocated model has no replica)."""
        self._server.check_health()

    def options(self, *, stream: bool = False, **_ignored: Any) -> "LocalHandle":
        """``stream`` as DeploymentHandle.options has it; transport options do not apply here."""
        return LocalHandle(self._server, stream)

    def __getattr__(self, method: str) -> "_LocalMethod":
        if method.startswith("_"):
            raise AttributeError(method)
        return _LocalMethod(getattr(self._server, method), self._stream)


class _LocalMethod:
    def __init__(self, fn: Callable[..., Any], stream: bool) -> None:
        self._fn = fn
        self._stream = stream

    def remote(self, *args: Any) -> Any:
        if self._stream or inspect.iscoroutinefunction(self._fn):
            return self._fn(*args)  # an async generator, or a coroutine
        return asyncio.to_thread(self._fn, *args)


def local_model_handles(specs: dict[str, tuple[Any, ...]]) -> dict[str, LocalHandle]:
    """{name: LocalHandle} of a ``ModelServer`` built here from each ``ModelServer.bind`` argument tuple."""
    from services.model_deployment import ModelServer

    server_class = ModelServer.func_or_class
    return {name: LocalHandle(server_class(*args)) for name, args in specs.items()}


__all__ = ["LocalHandle", "local_model_handles"]
