"""Request-level batches for image models (SDXL-Turbo): a one- to four-step run is short.

The same queue discipline as the text engine (:class:`~.loop.StepLoop`: submit, cancel,
deadlines, calls between steps, an optional thread): each step takes up to ``max_batch_size``
waiting requests, in arrival order, and runs them as one ``backend.generate_images`` call, whose
rows are steered by the same plan compiler and hooks as text. Should a batch fail, each of its
requests runs alone, so only the culprit sees the error.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sae_runtime.engine.loop import StepLoop
from sae_runtime.errors import Cancelled, DeadlineExceeded


@dataclass
class ImageRun:
    """One image request in the queue: the validated request, then its result or error."""

    id: int
    request: Any
    deadline: float | None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    batch_size: int = 0
    cancel_requested: bool = False
    result: Any = None
    error: BaseException | None = None
    on_done: Callable[["ImageRun"], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)


def run_isolated(fn: Callable[[list], Sequence], requests: list) -> list:
    """``fn(requests)``; if the batched call fails, each request alone (its result or exception)."""
    try:
        results = list(fn(requests))
        if len(results) != len(requests):
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        return results
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing row below
        if len(requests) == 1:
            return [batch_error]
    outcomes: list = []
    for request in requests:
        try:
            outcomes.append(fn([request])[0])
        except Exception as err:  # noqa: BLE001 - returned to that request's caller
            outcomes.append(err)
    return outcomes


class ImageBatches(StepLoop):
    """Batches of ``generate(requests) -> results`` calls, at most ``max_batch_size`` requests each."""

    thread_name = "image-batches"

    def __init__(self, generate: Callable[[list], Sequence], max_batch_size: int) -> None:
        super().__init__()
        self.generate_fn, self.max_batch_size = generate, max(1, int(max_batch_size))
        self.waiting: list[ImageRun] = []
        self._ids = itertools.count()

    def submit(self, request: Any, on_done: Callable[[ImageRun], None] | None = None, *, deadline: float | None = None) -> ImageRun:
        run = ImageRun(next(self._ids), request, deadline, on_done=on_done)
        self._enqueue(run)
        return run

    def generate(self, requests: Sequence[Any]) -> list:
        """Results of ``requests`` in order (library use: batched as the queue allows)."""
        runs = [self.submit(r) for r in requests]
        self.wait(runs)
        for run in runs:
            if run.error is not None:
                raise run.error
        return [run.result for run in runs]

    def _busy(self) -> bool:
        return bool(self.waiting)

    def _step(self, incoming: list[ImageRun]) -> int:
        self.waiting.extend(incoming)
        now = time.monotonic()
        for run in list(self.waiting):
            if run.cancel_requested:
                self._end(run, None, Cancelled("the request was cancelled"))
            elif run.deadline is not None and now > run.deadline:
                self._end(run, None, DeadlineExceeded("the request did not finish before its deadline"))
        batch, self.waiting = self.waiting[: self.max_batch_size], self.waiting[self.max_batch_size:]
        if not batch:
            return 0
        started = time.monotonic()
        outcomes = run_isolated(self.generate_fn, [r.request for r in batch])
        for run, outcome in zip(batch, outcomes):
            run.started, run.batch_size = started, len(batch)
            if isinstance(outcome, BaseException):
                self._end(run, None, outcome)
            else:
                self._end(run, outcome, None)
        return len(batch)

    def _end(self, run: ImageRun, result: Any, error: BaseException | None) -> None:
        if run in self.waiting:
            self.waiting.remove(run)
        run.result, run.error, run.finished = result, error, time.monotonic()
        if run.on_done is not None:
            try:
                run.on_done(run)
            except Exception:  # noqa: BLE001 - a consumer gone away must not stop the loop
                pass
        run.done.set()


__all__ = ["ImageBatches", "ImageRun", "run_isolated"]
