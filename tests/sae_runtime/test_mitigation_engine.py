"""Risk-gated mitigation inside the engine, on the shipped demo LM: decided per request after its
prefill, applied to that request's row alone.

The independent path is the two-pass emulation of sae_runtime.mitigation's contract: the prompt's
risk from ``backend.encode``, the decision from ``decide``, then a plain generation with
``mitigated_plan`` (or the abstention text).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_runtime.backends.types import EncodeRequest, SamplingParams, TextRequest
from sae_runtime.demo.eval import load_backend
from sae_runtime.errors import InvalidArgument
from sae_runtime.mitigation import Action, MitigationSpec, decide, mitigated_plan
from sae_runtime.plan import InterventionPlan

MODELS = Path(__file__).resolve().parents[2] / "models"
GROUNDED = "the owl lives in the river . question : where does the owl live ? answer :"
UNGROUNDED = "the owl lives in the river . question : what colour is the fox ? answer :"
GREEDY = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    return load_backend(MODELS, batch=8)


def _risk(backend, prompt: str) -> float:
    return backend.encode(EncodeRequest(text=prompt, saes=())).risk.probability


def test_gated_rows_abstain_or_steer_and_the_other_rows_of_their_steps_are_unchanged(backend):
    abstain, steer = MitigationSpec.parse("abstain", 0.5), MitigationSpec.parse("steer_unknown", 0.5)
    assert _risk(backend, UNGROUNDED) >= 0.5 > _risk(backend, GROUNDED)
    plain = [TextRequest(prompt=p, sampling=GREEDY) for p in (GROUNDED, UNGROUNDED)]
    requests = [
        TextRequest(prompt=UNGROUNDED, sampling=GREEDY, mitigation=abstain),
        TextRequest(prompt=UNGROUNDED, sampling=GREEDY, mitigation=steer),
        TextRequest(prompt=GROUNDED, sampling=GREEDY, mitigation=abstain),  # below the threshold: untouched
        *plain,
    ]
    together = backend.generate(requests)
    solo_plain = [backend.generate([r])[0] for r in plain]
    resources = backend.mitigation_resources

    got = together[0]
    assert got.mitigation == "abstain" and got.steered.finish_reason == "stop"
    assert got.steered.text == decide(abstain, _risk(backend, UNGROUNDED), resources).text
    assert "".join(t.text for t in got.steered.tokens) == got.steered.text

    decision = decide(steer, _risk(backend, UNGROUNDED), resources)
    assert decision.action is Action.STEER
    [want] = backend.generate([TextRequest(prompt=UNGROUNDED, sampling=GREEDY, plan=mitigated_plan(InterventionPlan(), decision))])
    assert together[1].mitigation == "steer"
    assert [t.id for t in together[1].steered.tokens] == [t.id for t in want.steered.tokens]

    assert together[2].mitigation == "" and together[2].steered.text == solo_plain[0].steered.text
    for got, want in zip(together[3:], solo_plain):
        assert got.mitigation == "" and [t.id for t in got.steered.tokens] == [t.id for t in want.steered.tokens]


def test_a_mitigation_the_model_cannot_serve_is_refused_naming_the_field(backend):
    with pytest.raises(InvalidArgument) as err:
        backend.validate(TextRequest(prompt=GROUNDED, mitigation=MitigationSpec.parse("suppress", 0.5, {"top_n": 10_000})))
    assert err.value.field == "mitigation.params.top_n"
