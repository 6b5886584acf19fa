"""The shipped demo models (models/demo-lm) load through the user path and do what the README
says; a quick build writes artifacts that load the same way."""

import json
from pathlib import Path

import pytest

from sae_runtime.backends.types import SamplingParams, TextRequest
from sae_runtime.demo import world
from sae_runtime.demo.build import MANIFEST, BuildConfig, build
from sae_runtime.demo.eval import SAE_NAME, STEER_VALUE, load_backend, story_prompts, top_quartile_risk
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit

MODELS = Path(__file__).resolve().parents[2] / "models"
SEED = 7_000  # disjoint from the build's (seed + 0..40) and the eval's (1000..1004) seeds


@pytest.fixture(scope="module")
def backend():
    return load_backend(MODELS)


def _answers(backend, prompts, plan=InterventionPlan(), max_new_tokens=2):
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    requests = [backend.validate(TextRequest(prompt=p, plan=plan, sampling=greedy)) for p in prompts]
    return backend.generate(requests)


def test_shipped_files_fit_the_budget_and_record_their_build():
    files = [f for f in (MODELS / "demo-lm").rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    manifest = json.loads((MODELS / "demo-lm" / MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["versions"]["torch"].startswith("2.13.0")
    assert manifest["build_seconds"] < 600


def test_shipped_lm_answers_held_out_intact_facts(backend):
    items = world.fact_items(60, seed=SEED, mix=[("intact", 0.0)])
    results = _answers(backend, [it.prompt for it in items])
    correct = sum(world.is_correct(it, r.steered.text) for it, r in zip(items, results))
    assert correct / len(items) >= 0.9, [(it.prompt, r.steered.text) for it, r in zip(items, results)][:5]


def test_clamping_a_colour_latent_by_label_steers_story_colours(backend):
    prompts = story_prompts(16, SEED + 1)
    plan = InterventionPlan(edits=(LatentEdit(sae=SAE_NAME, op=EditOp.SET, labels=("color:green",), value=STEER_VALUE),))

    def green_share(results) -> float:
        colours = [w for r in results for w in world.words_of(r.steered.text, "color")]
        return colours.count("green") / max(len(colours), 1)

    base = green_share(_answers(backend, prompts, max_new_tokens=16))
    steered = green_share(_answers(backend, prompts, plan, max_new_tokens=16))
    assert steered >= 0.6 and steered > base + 0.3, (base, steered)


def test_risk_is_higher_when_the_fact_is_absent(backend):
    intact = world.fact_items(40, seed=SEED + 2, mix=[("intact", 0.0)])
    absent = world.fact_items(40, seed=SEED + 2, mix=[("absent", 0.0)])
    risk = {
        name: [r.risk_prompt.probability for r in _answers(backend, [it.prompt for it in items])]
        for name, items in (("intact", intact), ("absent", absent))
    }
    assert sum(risk["absent"]) / 40 > sum(risk["intact"]) / 40 + 0.1, risk


def test_quick_build_writes_artifacts_that_load_through_the_backend(tmp_path):
    manifest = build(tmp_path, BuildConfig(seed=3).quick(), log=lambda _msg: None)
    assert {"lm", "sae", "labels", "risk"} <= set(manifest["metrics"])
    assert (tmp_path / "demo-lm" / MANIFEST).exists()
    built = load_backend(tmp_path)
    assert built.saes[SAE_NAME].labels, "latents are labelled"
    label = next(iter(built.saes[SAE_NAME].labels))
    plan = InterventionPlan(edits=(LatentEdit(sae=SAE_NAME, op=EditOp.SET, labels=(label,), value=5.0),))
    (result,) = _answers(built, ["the fox is"], plan, max_new_tokens=3)
    assert 1 <= len(result.steered.tokens) <= 3
    assert result.risk_final is not None and 0.0 <= result.risk_final.probability <= 1.0


def test_top_quartile_risk_averages_the_base_runs_riskiest_quarter():
    import torch

    base = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2, 0.3, 0.95, 0.4])
    mitigated = torch.tensor([0.0, 0.3, 0.5, 0.9, 0.2, 0.3, 0.15, 0.4])
    # riskiest quarter of 8 = items 6 (0.95) and 1 (0.9)
    assert top_quartile_risk(base, mitigated) == pytest.approx({"base": (0.95 + 0.9) / 2, "mitigated": (0.15 + 0.3) / 2})
