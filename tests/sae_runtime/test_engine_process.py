"""The engine in a child process (engine.separate_process): same results as in-process, events,
cancellation, errors that keep their field, and what happens when the child dies.

The child is a real process (``python -m sae_runtime.engine.process``) that loads the spec
through the same ``from_spec`` path; the independent path is the in-process engine of a backend
built from the same spec, one request at a time.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import replace

import pytest

from sae_runtime.backends.causal_lm import CausalLmBackend
from sae_runtime.backends.spec import EngineConfig
from sae_runtime.backends.types import SamplingParams, TextRequest
from sae_runtime.engine.process import EngineProcess
from sae_runtime.errors import Cancelled, InvalidArgument, TooLarge, Unavailable
from sae_runtime.plan import ReadoutSpec
from tests.sae_runtime.test_engine import PROMPTS, mixed_requests, same_result, tiny_spec


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return tiny_spec(tmp_path_factory.mktemp("proc"), "gpt2", EngineConfig(max_running_rows=8, separate_process=True))


@pytest.fixture(scope="module")
def backend(spec) -> CausalLmBackend:
    return CausalLmBackend.from_spec(spec)


@pytest.fixture(scope="module")
def engine(spec):
    proc = EngineProcess(spec, torch_threads=1)
    proc.start()
    yield proc
    proc.stop()


def _collect(engine: EngineProcess, prepared, *, stream: bool = False):
    events: list = []
    run = engine.submit(prepared, events.append, stream=stream)
    return run, events


def test_requests_run_in_the_child_equal_their_solo_runs_in_process(engine, backend):
    requests = mixed_requests() * 2
    solo = [backend.generate([r])[0] for r in mixed_requests()] * 2
    submitted = [_collect(engine, backend.validate(r)) for r in requests]  # all at once: they share steps
    for (run, events), want in zip(submitted, solo):
        assert run.done.wait(60)
        assert events[-1].error is None
        same_result(events[-1].result, want)
        assert events[-1].result.timings.batch_size >= 1


def test_a_streamed_request_gets_its_tokens_then_the_unary_result(engine, backend):
    request = mixed_requests()[0]
    run, events = _collect(engine, backend.validate(request), stream=True)
    assert run.done.wait(60)
    tokens, final = events[:-1], events[-1]
    unary = backend.generate([request])[0]
    assert [e.token.id for e in tokens] == [t.id for t in unary.steered.tokens]
    same_result(final.result, unary)


def test_concurrent_callers_from_many_threads_each_get_their_own_result(engine, backend):
    requests = [TextRequest(prompt=PROMPTS[i % len(PROMPTS)], sampling=SamplingParams(max_new_tokens=4 + i % 5, temperature=1.0, seed=i))
                for i in range(24)]
    want = [backend.generate([r])[0] for r in requests]
    got: dict[int, object] = {}

    def call(i: int) -> None:
        run, events = _collect(engine, backend.validate(requests[i]))
        run.done.wait(60)
        got[i] = events[-1].result

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, w in enumerate(want):
        same_result(got[i], w)


def test_requests_carrying_tensors_and_large_results_cross_the_socket(engine, backend):
    """Requests of several MB of tensor (a stand-in for LLaVA pixel values: the text engine ignores
    them) go in while results holding every latent of every position come out, from 16 threads.
    Tensors must travel by plain pickle: torch's multiprocessing reductions would hand them over
    through shared memory and an authenticated resource sharer the child cannot reach."""
    import torch

    big = replace(backend.validate(TextRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=2))),
                  pixel_values=torch.zeros(1, 3, 640, 640))  # 4.9 MB pickled
    wide = TextRequest(prompt=PROMPTS[3], readout=ReadoutSpec(("s",), 64), sampling=SamplingParams(max_new_tokens=30))
    want = backend.generate([wide])[0]
    results: list = []

    def send(prepared) -> None:
        run, events = _collect(engine, prepared)
        assert run.done.wait(120), "a request never ended: the pipe stalled"
        results.append(events[-1])

    threads = [threading.Thread(target=send, args=(big if i % 2 else backend.validate(wide),)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert len(results) == 16 and all(e.error is None for e in results)
    for e in results:
        if len(e.result.steered.tokens) > 2:
            same_result(e.result, want)


def test_a_cancelled_request_ends_cancelled_and_the_engine_goes_on(engine, backend):
    long = backend.validate(TextRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_new_tokens=32)))
    run, events = _collect(engine, long, stream=True)
    engine.cancel(run)
    assert run.done.wait(60)
    assert isinstance(events[-1].error, Cancelled)
    assert len(events) - 1 < 32  # it left before generating every token
    short = TextRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=3))
    after, events = _collect(engine, backend.validate(short))
    assert after.done.wait(60)
    same_result(events[-1].result, backend.generate([short])[0])


def test_a_request_too_large_for_the_engine_fails_at_submission(engine, backend):
    wide = replace(backend.validate(TextRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_new_tokens=3))),
                   variant_plans=(None,) * 8)  # type: ignore[arg-type]
    with pytest.raises(TooLarge):
        engine.submit(wide)


def test_typed_errors_keep_their_field_across_processes():
    err = pickle.loads(pickle.dumps(InvalidArgument("must be finite", field="plan.edits[0].value")))
    assert type(err) is InvalidArgument
    assert err.field == "plan.edits[0].value" and err.message == "must be finite"
    assert str(err) == "plan.edits[0].value: must be finite"


def test_when_the_child_dies_its_requests_and_later_ones_fail_unavailable(spec, backend):
    proc = EngineProcess(spec, torch_threads=1)
    proc.start()
    try:
        long = backend.validate(TextRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_new_tokens=32)))
        run, events = _collect(proc, long, stream=True)
        proc._proc.kill()  # the child is gone, as after an out-of-memory kill
        assert run.done.wait(30)
        assert isinstance(events[-1].error, Unavailable)
        assert not proc.alive
        with pytest.raises(Unavailable):
            proc.submit(long)
    finally:
        proc.stop()


def test_a_spec_that_cannot_load_fails_the_start_with_the_childs_error(spec, tmp_path):
    with pytest.raises(Exception) as info:
        EngineProcess(replace(spec, path=str(tmp_path / "missing")), torch_threads=1)
    assert "missing" in str(info.value)


def test_a_request_the_child_cannot_start_fails_alone(engine, backend):
    good = backend.validate(TextRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=3)))
    broken = replace(good, seed="not a seed")  # type: ignore[arg-type] - fails in the child's engine.submit
    run, events = _collect(engine, broken)
    assert run.done.wait(60) and events[-1].error is not None and events[-1].result is None
    after, events = _collect(engine, good)
    assert after.done.wait(60)
    same_result(events[-1].result, backend.generate([TextRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=3))])[0])


def test_an_error_that_does_not_pickle_still_reaches_its_request():
    import socket
    from multiprocessing.connection import Connection

    from sae_runtime.backends.types import StreamEvent
    from sae_runtime.engine.process import _recv, _send_events
    from sae_runtime.errors import SaeRuntimeError

    class LibraryError(Exception):
        def __init__(self) -> None:
            super().__init__("a library's own failure")
            self.callback = lambda: None  # lambdas do not pickle

    a, b = socket.socketpair()
    ours, theirs = Connection(a.detach()), Connection(b.detach())
    _send_events(theirs, [(7, StreamEvent(token=None, error=LibraryError()))], [])
    kind, events, stats = _recv(ours)
    (run_id, event), = events
    assert kind == "events" and run_id == 7 and stats == []
    assert type(event.error) is SaeRuntimeError and "LibraryError: a library's own failure" in str(event.error)
