"""The step loop an engine runs on: a submission queue, cancellation, calls between steps, a thread.

An engine subclasses :class:`StepLoop` and implements :meth:`StepLoop._step` (one step over the
requests that arrived since the last one) and :meth:`StepLoop._busy` (whether work remains).
``start()`` runs steps on a daemon thread whenever there is work; without the thread, callers
drive :meth:`step` themselves (library use, tests, benchmarks): the same code path either way.
Everything that touches the model runs inside a step, on one thread at a time.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            self.future.set_exception(err)


class StepLoop:
    """Queue, wake-ups and the optional thread shared by the text engine and image batches."""

    thread_name = "engine"

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._incoming: list[Any] = []
        self._calls: list[_Call] = []
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- for subclasses ----------------------------------------------------------------------------
    def _step(self, incoming: list[Any]) -> Any:
        raise NotImplementedError

    def _busy(self) -> bool:
        raise NotImplementedError

    def _before_calls(self) -> None:
        """Make the model plain for calls between steps (an engine detaches its hooks here)."""

    def _enqueue(self, run: Any) -> None:
        with self._lock:
            self._incoming.append(run)
            self._lock.notify()

    # -- public ------------------------------------------------------------------------------------
    def cancel(self, run: Any) -> None:
        """Ask ``run`` to leave; it ends CANCELLED at the next step boundary."""
        with self._lock:
            run.cancel_requested = True
            self._lock.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine's thread between two steps (no steering hooks attached)."""
        item = _Call(fn)
        if self._thread is None:
            with self._step_lock:
                self._before_calls()
                item.run()
            return item.future
        with self._lock:
            self._calls.append(item)
            self._lock.notify()
        return item.future

    def step(self) -> Any:
        """Run pending calls, then one step over what arrived."""
        with self._step_lock:
            with self._lock:
                incoming, self._incoming = self._incoming, []
                calls, self._calls = self._calls, []
            if calls:
                self._before_calls()
            for call in calls:
                call.run()
            return self._step(incoming)

    def start(self) -> None:
        """Run steps on a daemon thread whenever there is work, until :meth:`stop`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def busy(self) -> bool:
        """Something to do: arrivals, calls, waiting or running work."""
        with self._lock:
            return bool(self._incoming or self._calls or self._busy())

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._incoming or self._calls or self._busy()):
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    def wait(self, runs: Sequence[Any]) -> None:
        """Until every run in ``runs`` has ended (stepping here when no thread runs the loop)."""
        if self._thread is not None:
            for run in runs:
                run.done.wait()
            return
        while not all(r.done.is_set() for r in runs):
            self.step()


__all__ = ["StepLoop"]
