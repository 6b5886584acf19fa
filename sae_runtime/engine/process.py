"""The text engine in a child process of its own (``engine.separate_process``).

In the replica, the engine's steps share one interpreter lock with everything else the replica
runs in Python: Ray Serve's request handling, gRPC, our validation and proto conversion. PyTorch
releases that lock at every operator and takes it back after, so each request handled while a
step runs stalls the step. Measured on 2 cores at concurrency 16 (README, "Engine"), a decode
step of about 15 rows took about 6 ms in the replica and 2.8 ms in a process of its own. vLLM's V1
engine core runs in its own process for the same reason.

:class:`EngineProcess` keeps the replica's side of the engine's interface (``submit``, ``cancel``,
``on_step``, ``start``, ``stop``) and runs a :class:`~.engine.TextEngine` in a child interpreter that
loads the same :class:`~sae_runtime.backends.spec.ModelSpec`. The replica still validates
requests (tokens, resolved plans) with its own backend, which also serves the calls that are not
generation (Encode, EvaluateSae, ...). The child gets validated requests over a pipe, steps
whenever it has work, and sends each step's events (token events of streamed requests, final
results, errors) and its :class:`~.engine.StepStats` back in one message per step.

The child holds a second copy of the weights, so this mode is for models that are small next to
the machine's memory. If the child dies, every request it held fails with
:class:`~sae_runtime.errors.Unavailable` and so does every later request.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from dataclasses import dataclass, field
from typing import Any, Callable

from sae_runtime.backends.spec import ModelSpec
from sae_runtime.backends.types import StreamEvent
from sae_runtime.engine.request import EventSink, PreparedText
from sae_runtime.errors import SaeRuntimeError, Unavailable


@dataclass
class RemoteRun(EventSink):
    """The replica's handle on a request running in the child: its event sink and end."""

    id: int
    on_event: Callable[[StreamEvent], None] | None
    done: threading.Event = field(default_factory=threading.Event)


class EngineProcess:
    """A :class:`~.engine.TextEngine` for ``spec`` in a spawned child process.

    ``config``: the engine's knobs, checked here so that a request too large for the engine fails
    at submission as it does in-process. ``torch_threads``: the child's torch thread count."""

    def __init__(self, spec: ModelSpec, torch_threads: int | None = None, *, start_timeout_s: float = 600.0) -> None:
        self.config = spec.engine
        # A fresh interpreter (not fork: the replica's threads hold locks; not multiprocessing's
        # spawn: it re-imports the replica's __main__), joined by a socket pair.
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "sae_runtime.engine.process", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        _send(self._conn, (spec, torch_threads))
        if not self._conn.poll(start_timeout_s):
            self._proc.kill()
            raise Unavailable(f"the engine process for {spec.name!r} did not start within {start_timeout_s:.0f} s")
        try:
            kind, payload = _recv(self._conn)
        except EOFError:
            kind, payload = "error", Unavailable(f"the engine process for {spec.name!r} exited at start "
                                                 f"(code {self._proc.wait()})")
        if kind != "ready":
            self._proc.wait(10)
            raise payload
        self._ids = itertools.count()
        self._runs: dict[int, RemoteRun] = {}
        # Two locks: a sender blocked on a full socket must never hold the one the reader needs,
        # or the reader stops draining the child, which then never reads (a deadlock).
        self._lock = threading.Lock()  # _runs and _dead
        self._send_lock = threading.Lock()  # the socket's sending end
        self._dead: BaseException | None = None
        self._reader: threading.Thread | None = None
        self.on_step: Callable[[Any], None] | None = None

    # -- the replica's side ----------------------------------------------------------------------
    def start(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
            self._reader.start()

    def submit(self, prepared: PreparedText, on_event: Callable[[StreamEvent], None] | None = None, *,
               stream: bool = False, deadline: float | None = None) -> RemoteRun:
        """As :meth:`TextEngine.submit`; ``on_event`` is called from the reader thread."""
        self.config.check_fits(prepared.n_sequences, prepared.reserved_tokens, "sampling.max_new_tokens")
        with self._lock:
            if self._dead is not None:
                raise Unavailable(f"the engine process is gone: {self._dead}")
            run = RemoteRun(next(self._ids), on_event)
            self._runs[run.id] = run  # before sending: its events may come back at once
        try:
            self._post(("submit", run.id, prepared, stream, deadline, time.monotonic()))
        except Unavailable:
            with self._lock:
                self._runs.pop(run.id, None)
            raise
        return run

    def cancel(self, run: RemoteRun) -> None:
        """Ask ``run`` to leave; it ends CANCELLED at the child's next step boundary."""
        with self._lock:
            pending = self._dead is None and run.id in self._runs
        if pending:
            try:
                self._post(("cancel", run.id))
            except Unavailable:
                pass  # the reader fails the run

    def _post(self, message: tuple) -> None:
        try:
            with self._send_lock:
                _send(self._conn, message)
        except OSError as err:
            raise Unavailable(f"the engine process is gone: {err!r}") from err

    def stop(self) -> None:
        if self._dead is None:
            try:
                self._post(("stop",))
            except Unavailable:
                pass
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    def _read(self) -> None:
        """Deliver the child's events until it stops (then fail whatever it still held)."""
        try:
            while True:
                kind, *payload = _recv(self._conn)
                if kind == "stopped":
                    return self._fail_all(Unavailable("the engine process stopped"))
                events, stats = payload
                for run_id, event in events:
                    with self._lock:
                        run = self._runs.get(run_id)
                        if run is not None and (event.result is not None or event.error is not None):
                            del self._runs[run_id]
                    if run is None:
                        continue
                    run.emit(event)
                    if event.result is not None or event.error is not None:
                        run.done.set()
                if self.on_step is not None:
                    for s in stats:
                        self.on_step(s)
        except (EOFError, OSError) as err:
            self._fail_all(Unavailable(f"the engine process exited (code {self._proc.poll()}): {err!r}"))
        except Exception as err:  # noqa: BLE001 - a message that cannot be read: the channel is lost
            self._fail_all(Unavailable(f"the engine process sent a message that could not be read: {err!r}"))
            self._proc.kill()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._dead = error
            runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            run.emit(StreamEvent(token=None, error=error))
            run.done.set()


# -- the wire ----------------------------------------------------------------------------------------
def _send(conn: Connection, message: Any) -> None:
    # Plain pickle, not Connection.send's ForkingPickler: torch registers reductions with that
    # pickler that pass tensors through shared memory and multiprocessing's authenticated
    # resource sharer, which a child not started by multiprocessing cannot reach.
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _send_events(conn: Connection, events: list[tuple[int, StreamEvent]], stats: list[Any]) -> None:
    """One step's events; an error that does not pickle (an exception of some library's own) goes
    as a SaeRuntimeError naming it, so its request still fails with a message."""
    try:
        data = pickle.dumps(("events", events, stats), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - pickling can fail in many ways; the message must still go
        events = [(rid, e if e.error is None else StreamEvent(token=None, error=SaeRuntimeError(f"{type(e.error).__name__}: {e.error}")))
                  for rid, e in events]
        data = pickle.dumps(("events", events, stats), protocol=pickle.HIGHEST_PROTOCOL)
    conn.send_bytes(data)


# -- the child -------------------------------------------------------------------------------------
def _child_main(conn: Connection) -> None:
    """Load the spec the replica sends first, then step its engine whenever there is work, until
    told to stop or the replica's end of the socket closes."""
    try:
        spec, torch_threads = _recv(conn)
        import torch

        from sae_runtime.backends.registry import build_backend

        if torch_threads:
            torch.set_num_threads(torch_threads)
        engine = build_backend(spec).engine
    except BaseException as err:  # noqa: BLE001 - reported to the replica, which raises it
        _send(conn, ("error", err))
        return
    out: list[tuple[int, StreamEvent]] = []
    stats: list[Any] = []
    engine.on_step = stats.append
    runs: dict[int, Any] = {}
    _send(conn, ("ready", None))
    try:
        while True:
            if not engine.busy:
                conn.poll(None)  # idle: block until the replica sends something
            while conn.poll(0):
                msg = _recv(conn)
                if msg[0] == "stop":
                    _send(conn, ("stopped",))
                    return
                if msg[0] == "cancel":
                    if msg[1] in runs:
                        engine.cancel(runs[msg[1]])
                    continue
                _, run_id, prepared, stream, deadline, submitted = msg
                try:
                    run = engine.submit(prepared, lambda e, rid=run_id: out.append((rid, e)), stream=stream, deadline=deadline)
                except Exception as err:  # noqa: BLE001 - this request fails alone
                    out.append((run_id, StreamEvent(token=None, error=err)))
                    continue
                run.submitted = submitted  # the replica's clock: queue time includes the pipe
                runs[run_id] = run
            engine.step()
            for run_id, event in out:
                if event.result is not None or event.error is not None:
                    runs.pop(run_id, None)
            if out or stats:
                _send_events(conn, out, stats)
                out.clear()
                stats.clear()
    except (EOFError, OSError, BrokenPipeError):
        return  # the replica is gone


__all__ = ["EngineProcess", "RemoteRun"]

if __name__ == "__main__":
    _child_main(Connection(int(sys.argv[1])))
