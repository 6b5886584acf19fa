"""The text engine: requests joining and leaving running steps equal their solo runs; scheduling.

Models are tiny causal LMs saved with save_pretrained and loaded through CausalLmBackend.from_spec,
in two families: Llama (rotary positions) and GPT-2 (absolute positions, so a wrong position id
under left padding changes the logits). The independent path for every staggered run is the same
request generated alone (one request in the engine: no padding, no other rows).
"""

from __future__ import annotations

import threading

import pytest
import torch

from sae_runtime.backends.causal_lm import CausalLmBackend
from sae_runtime.backends.spec import EngineConfig, Limits, ModelSpec, SaeSpec
from sae_runtime.backends.types import SamplingParams, TextRequest
from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.engine import RequestStatus
from sae_runtime.errors import Cancelled, DeadlineExceeded, TooLarge
from sae_runtime.formats import save_native
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, TokenScope
from sae_runtime.saes import SaeConfig, build_sae

D_MODEL, D_SAE = 32, 64
PROMPTS = ("the cat is red and the dog", "a bird", "where is the big house", "one two three four five six", "red")


def tiny_spec(root, family: str, engine: EngineConfig = EngineConfig()) -> ModelSpec:
    """A tiny ``family`` LM with one JumpReLU SAE, saved under ``root``, as a ModelSpec."""
    model_dir = build_tiny_causal_lm(root / family, family, seed=0, init_std=0.2)
    torch.manual_seed(1)
    sae = build_sae(SaeConfig("jumprelu", D_MODEL, D_SAE, hook_name="blocks.0.hook_resid_post"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0.0, 0.3)
        sae.threshold.fill_(0.2)
    save_native(sae, root / f"{family}-sae")
    return ModelSpec(name=family, kind="causal_lm", path=str(model_dir), saes=(SaeSpec("s", str(root / f"{family}-sae")),),
                     limits=Limits(max_prompt_tokens=32, max_new_tokens=32), engine=engine)


def _backend(root, family: str, engine: EngineConfig = EngineConfig()) -> CausalLmBackend:
    return CausalLmBackend.from_spec(tiny_spec(root, family, engine))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def backend(request, tmp_path_factory) -> CausalLmBackend:
    return _backend(tmp_path_factory.mktemp(request.param), request.param)


def _edit(op: EditOp, latents, value: float, tokens: TokenScope = TokenScope.ALL) -> InterventionPlan:
    return InterventionPlan((LatentEdit("s", op, tuple(latents), value),), scope=Scope(tokens=tokens))


def mixed_requests() -> list[TextRequest]:
    """Mixed requests: greedy and seeded sampling, with and without plans, every token scope,
    readouts with different top-k, an unsteered twin, log-probs."""
    return [
        TextRequest(prompt=PROMPTS[0], plan=_edit(EditOp.SET, (3, 7), 4.0), sampling=SamplingParams(max_new_tokens=9)),
        TextRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=5, temperature=1.0, seed=11), logprobs=2),
        TextRequest(prompt=PROMPTS[2], plan=_edit(EditOp.ADD, (5,), 6.0, TokenScope.PROMPT),
                    readout=ReadoutSpec(("s",), 3), sampling=SamplingParams(max_new_tokens=7, temperature=0.8, seed=3)),
        TextRequest(prompt=PROMPTS[3], plan=_edit(EditOp.SCALE, (1, 2, 9), -2.0, TokenScope.GENERATED),
                    include_default=True, sampling=SamplingParams(max_new_tokens=6, temperature=1.2, seed=5)),
        TextRequest(prompt=PROMPTS[4], plan=_edit(EditOp.ABLATE, (0, 4), 0.0), readout=ReadoutSpec(("s",), 1),
                    sampling=SamplingParams(max_new_tokens=4)),
        TextRequest(prompt=PROMPTS[1], plan=_edit(EditOp.CAP, (8,), 0.1), sampling=SamplingParams(max_new_tokens=8, seed=2)),
    ]


def same_result(got, want) -> None:
    for a, b in ((got.steered, want.steered), (got.default, want.default)):
        if b is None:
            assert a is None
            continue
        assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
        assert a.text == b.text and a.finish_reason == b.finish_reason
        for x, y in zip(a.tokens, b.tokens):
            assert (x.logprob is None) == (y.logprob is None)
            if x.logprob is not None:
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [[v.index for v in p.after] for p in x.latents] == [[v.index for v in p.after] for p in y.latents]
    assert [[[v.index for v in p.after] for p in pos] for pos in got.prompt_latents] == \
        [[[v.index for v in p.after] for p in pos] for pos in want.prompt_latents]


def test_requests_joining_and_leaving_running_steps_equal_their_solo_runs(backend):
    requests = mixed_requests()
    solo = [backend.generate([r])[0] for r in requests]
    engine = backend.engine
    runs, widths = [], []
    # Two requests start (one padded prefill); the others join, some two at a time, while earlier
    # ones decode or leave.
    joining = {0: 2, 2: 1, 4: 2, 9: 1}
    for step in range(60):
        for _ in range(joining.get(step, 0)):
            runs.append(engine.submit(backend.validate(requests[len(runs)])))
        stats = engine.step()
        widths.append(0 if stats is None else stats.decoded_rows)
        if len(runs) == len(requests) and all(r.done.is_set() for r in runs):
            break
    assert all(r.status is RequestStatus.FINISHED for r in runs)
    assert max(widths) >= 4 and len(set(widths)) > 2  # rows really joined and left mid-flight
    for run, want in zip(runs, solo):
        same_result(run.result, want)


def test_many_staggered_requests_share_steps_and_keep_their_solo_tokens(backend):
    requests = [r for _ in range(3) for r in mixed_requests()]
    solo = [backend.generate([r])[0] for r in mixed_requests()] * 3
    engine = backend.engine
    runs = []
    for i, r in enumerate(requests):
        runs.append(engine.submit(backend.validate(r)))
        if i % 3 == 2:
            engine.step()
    engine.wait(runs)
    for run, want in zip(runs, solo):
        same_result(run.result, want)


def test_a_cancelled_request_frees_its_slot_and_the_next_is_admitted_within_one_step(tmp_path):
    backend = _backend(tmp_path, "llama", EngineConfig(max_running_rows=2))
    engine = backend.engine
    long = SamplingParams(max_new_tokens=30, stop=())
    events: list = []
    a = engine.submit(backend.validate(TextRequest(prompt=PROMPTS[0], sampling=long)), events.append)
    b = engine.submit(backend.validate(TextRequest(prompt=PROMPTS[1], sampling=long)))
    c = engine.submit(backend.validate(TextRequest(prompt=PROMPTS[2], sampling=SamplingParams(max_new_tokens=3))))
    engine.step()
    engine.step()
    assert engine.running_rows == 2 and engine.waiting == 1 and c.status is RequestStatus.WAITING
    generated = len(a.steered.text.records)
    engine.cancel(a)
    engine.step()
    assert a.status is RequestStatus.CANCELLED and isinstance(events[-1].error, Cancelled)
    assert len(a.steered.text.records) == generated  # no token computed for it after the cancel
    assert c.status is RequestStatus.DECODING  # admitted into the freed slot in that same step
    engine.wait([b, c])
    assert c.result.steered.tokens == backend.generate([TextRequest(prompt=PROMPTS[2], sampling=SamplingParams(max_new_tokens=3))])[0].steered.tokens


def test_the_kv_bound_makes_admission_wait_and_loses_nothing(tmp_path):
    backend = _backend(tmp_path, "llama")
    requests = [TextRequest(prompt=p, sampling=SamplingParams(max_new_tokens=8)) for p in PROMPTS[1:4]]
    reserved = [backend.validate(r).reserved_tokens for r in requests]
    bound = max(reserved)  # each fits alone, no two together
    assert min(a + b for i, a in enumerate(reserved) for b in reserved[i + 1:]) > bound
    backend.engine = backend._new_engine(EngineConfig(max_running_rows=8, max_kv_tokens=bound))
    runs = [backend.engine.submit(backend.validate(r)) for r in requests]
    most = 0
    while not all(r.done.is_set() for r in runs):
        stats = backend.engine.step()
        most = max(most, stats.running_rows if stats else 0)
        assert backend.engine.scheduler.reserved <= bound
    assert most == 1 and all(r.status is RequestStatus.FINISHED for r in runs)
    for run, r in zip(runs, requests):
        assert run.result.steered.tokens == backend.generate([r])[0].steered.tokens
    with pytest.raises(TooLarge) as err:
        backend.validate(TextRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_new_tokens=30)))
    assert err.value.field == "sampling.max_new_tokens"


def test_an_expired_request_ends_deadline_exceeded_at_the_next_step(tmp_path):
    backend = _backend(tmp_path, "llama")
    events: list = []
    run = backend.engine.submit(backend.validate(TextRequest(prompt=PROMPTS[0])), events.append, deadline=0.0)
    backend.engine.step()
    assert run.status is RequestStatus.FAILED and isinstance(events[-1].error, DeadlineExceeded)
    assert backend.engine.running_rows == 0


def test_a_failure_while_admitting_ends_the_request_and_frees_its_slots(tmp_path):
    """A step that fails before its admitted requests ran (here their sampler setup raises) ends
    them FAILED with the error (it used to leave them neither waiting nor running, so a caller
    waited forever) and frees their slots; the next request runs as if nothing happened."""
    backend = _backend(tmp_path, "llama")
    engine = backend.engine
    want = backend.generate([TextRequest(prompt=PROMPTS[0], plan=_edit(EditOp.SET, (3,), 2.0))])[0]
    free = sorted(engine._free)
    real_assign = engine.sampler.assign
    calls = {"n": 0}

    def assign_once_broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second row of the batch: the first row's slot is already taken
            raise RuntimeError("sampler setup failed")
        return real_assign(*args, **kwargs)

    engine.sampler.assign = assign_once_broken
    events: list = []
    runs = [engine.submit(backend.validate(TextRequest(prompt=p)), events.append) for p in PROMPTS[1:3]]
    engine.wait(runs)
    assert all(r.status is RequestStatus.FAILED and isinstance(r.error, RuntimeError) for r in runs)
    assert sorted(engine._free) == free and engine.running_rows == 0 and not engine.scheduler.waiting
    got = backend.generate([TextRequest(prompt=PROMPTS[0], plan=_edit(EditOp.SET, (3,), 2.0))])[0]
    same_result(got, want)


def test_the_threaded_engine_serves_concurrent_callers(tmp_path):
    backend = _backend(tmp_path, "llama")
    requests = mixed_requests()
    solo = [backend.generate([r])[0] for r in requests]
    backend.engine.start()
    try:
        results: dict[int, object] = {}

        def call(i: int) -> None:
            results[i] = backend.generate([requests[i]])[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        streamed = list(backend.stream(requests[2]))
    finally:
        backend.engine.stop()
    for i, want in enumerate(solo):
        same_result(results[i], want)
    assert tuple(e.token for e in streamed[:-1]) == streamed[-1].result.steered.tokens
    same_result(streamed[-1].result, solo[2])


def _hooks_on(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_stay_on_between_steps_and_come_off_for_calls_and_when_idle(tmp_path):
    backend = _backend(tmp_path, "llama")
    engine, model = backend.engine, backend.model
    plain = _hooks_on(model)
    steered = TextRequest(prompt=PROMPTS[0], plan=_edit(EditOp.SET, (3, 7), 4.0), sampling=SamplingParams(max_new_tokens=6))
    run = engine.submit(backend.validate(steered))
    engine.step()
    assert _hooks_on(model) > plain  # attached by the step and kept for the next one
    seen = engine.call(lambda: _hooks_on(model)).result()
    assert seen == plain  # a call between steps sees the plain model
    engine.wait([run])
    assert _hooks_on(model) == plain  # idle: detached
    assert run.result.steered.tokens == backend.generate([steered])[0].steered.tokens
