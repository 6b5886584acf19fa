"""The per-request mitigation: spec validation, decisions, plans, and (through the backend) that a
mitigated row leaves the other rows of its batch unchanged."""

import pytest
import torch

from sae_runtime.backends.causal_lm import CausalLmBackend
from sae_runtime.backends.spec import ModelSpec, SaeSpec
from sae_runtime.backends.types import SamplingParams, TextRequest
from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.demo.tiny_saes import random_probe, random_sae
from sae_runtime.errors import InvalidArgument
from sae_runtime.formats import save_native
from sae_runtime.mitigation import Action, MitigationResources, MitigationSpec, check, decide, mitigated_plan
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit
from sae_runtime.risk import mitigation_edits

D_SAE = 48


def _probe():
    probe = random_probe("s", D_SAE, seed=4)
    probe.meta = {"abstain_text": "unknown .", "unknown_latents": {"sae": "s", "latents": [5, 9], "values": [2.0, 3.5]}}
    return probe


@pytest.mark.parametrize(
    "mode, threshold, params, field",
    [("loud", 0.5, {}, "mitigation.mode"), ("abstain", 1.5, {}, "mitigation.threshold"), ("abstain", float("nan"), {}, "mitigation.threshold"),
     ("abstain", 0.5, {"top_n": 3}, "mitigation.params.top_n"), ("suppress", 0.5, {"top_n": 0}, "mitigation.params.top_n"),
     ("steer_unknown", 0.5, {"scale": "big"}, "mitigation.params.scale"), ("abstain", 0.5, {"text": " "}, "mitigation.params.text")],
)  # fmt: skip
def test_bad_specs_name_their_field(mode, threshold, params, field):
    with pytest.raises(InvalidArgument) as err:
        MitigationSpec.parse(mode, threshold, params)
    assert err.value.field == field


def test_decisions_gate_on_the_threshold_and_follow_the_mode():
    probe = _probe()
    res = MitigationResources.from_probe(probe)
    assert res.unknown_latents == (("s", 5, 2.0), ("s", 9, 3.5)) and res.abstain_text == "unknown ."
    abstain = MitigationSpec.parse("abstain", 0.6)
    assert decide(abstain, 0.59, res) == decide(abstain, 0.59, res)  # pure
    assert decide(abstain, 0.59, res).action is Action.PASS and not decide(abstain, 0.59, res).gated
    d = decide(abstain, 0.6, res)
    assert (d.action, d.text, d.gated, d.risk) == (Action.ABSTAIN, "unknown .", True, 0.6)
    assert decide(MitigationSpec.parse("abstain", 0.2, {"text": "no idea"}), 0.3, res).text == "no idea"
    steer = decide(MitigationSpec.parse("steer_unknown", 0.5, {"scale": 2}), 0.9, res)
    assert steer.action is Action.STEER
    assert steer.edits == (LatentEdit("s", EditOp.SET, (5,), 4.0), LatentEdit("s", EditOp.SET, (9,), 7.0))
    # suppress ablates exactly what the probe's own mitigation_edits names
    assert decide(MitigationSpec.parse("suppress", 0.5, {"top_n": 4}), 0.7, res).edits == mitigation_edits(probe, 4)
    assert decide(MitigationSpec.parse("none", 0.0), 1.0, res).action is Action.PASS
    assert decide(abstain, None, MitigationResources()).action is Action.PASS


def test_check_refuses_modes_the_model_cannot_serve():
    with pytest.raises(InvalidArgument) as err:
        check(MitigationSpec.parse("abstain"), MitigationResources.from_probe(None))
    assert err.value.field == "mitigation.mode"
    bare = random_probe("s", D_SAE, seed=4)
    with pytest.raises(InvalidArgument):
        check(MitigationSpec.parse("steer_unknown"), MitigationResources.from_probe(bare))
    check(MitigationSpec.parse("none"), MitigationResources())


def test_mitigated_plan_appends_steer_edits_only():
    plan = InterventionPlan(edits=(LatentEdit("s", EditOp.ADD, (1,), 1.0),))
    res = MitigationResources.from_probe(_probe())
    steer = decide(MitigationSpec.parse("steer_unknown", 0.1), 0.5, res)
    assert mitigated_plan(plan, steer).edits == plan.edits + steer.edits
    assert mitigated_plan(plan, steer).scope == plan.scope
    assert mitigated_plan(plan, decide(MitigationSpec.parse("abstain", 0.1), 0.5, res)) is plan
    assert mitigated_plan(plan, decide(MitigationSpec.parse("steer_unknown", 0.9), 0.5, res)) is plan


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("mitigation")
    model = build_tiny_causal_lm(root / "lm", seed=0, init_std=0.2)
    save_native(random_sae(32, D_SAE, "blocks.0.hook_resid_post", seed=1), root / "s")
    _probe().save(root / "risk")
    return CausalLmBackend.from_spec(ModelSpec("m", "causal_lm", str(model), saes=(SaeSpec("s", str(root / "s")),), risk_probe=str(root / "risk")))


def test_a_mitigated_row_leaves_the_other_rows_of_its_batch_unchanged(backend):
    from sae_runtime.demo.mitigation_eval import generate, prompt_risks, run_mitigated

    res = MitigationResources.from_probe(backend.risk_probe)
    prompts = ["w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    risks = prompt_risks(backend, prompts)
    # the encode risk is the prompt risk generation reports
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    plain = backend.generate([backend.validate(TextRequest(prompt=p, sampling=greedy)) for p in prompts])
    assert [r.risk_prompt.probability for r in plain] == pytest.approx(risks, abs=1e-6)
    spec = MitigationSpec.parse("steer_unknown", 0.0, {"scale": 40.0})  # gates every row; big clamp
    decisions = [decide(spec, r, res) for r in risks]
    gated_row = 1
    plans = [mitigated_plan(InterventionPlan(), decisions[i]) if i == gated_row else InterventionPlan() for i in range(3)]
    batch = backend.generate([backend.validate(TextRequest(prompt=p, plan=pl, sampling=greedy)) for p, pl in zip(prompts, plans)])
    for i in (0, 2):
        assert batch[i].steered.text == plain[i].steered.text
        assert [t.id for t in batch[i].steered.tokens] == [t.id for t in plain[i].steered.tokens]
    alone = backend.generate([backend.validate(TextRequest(prompt=prompts[gated_row], plan=plans[gated_row], sampling=greedy))])[0]
    assert batch[gated_row].steered.text == alone.steered.text
    assert batch[gated_row].risk_final.probability != pytest.approx(plain[gated_row].risk_final.probability, abs=1e-6)
    # the emulation: abstaining rows take the text, the others their plain answer
    t = sorted(risks)[1]
    answers, gated = run_mitigated(backend, prompts, MitigationSpec.parse("abstain", t), res)
    assert gated == [r >= t for r in risks] and sum(gated) == 2
    expected = generate(backend, prompts, [InterventionPlan()] * 3)
    assert answers == ["unknown ." if g else e for g, e in zip(gated, expected)]
