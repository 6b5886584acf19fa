"""The concept world is deterministic, its checker labels hand-made cases right, and the shipped
demo LM loads through from_pretrained + load_sae + RiskProbe.load and answers intact facts."""

from pathlib import Path

import pytest

from sae_runtime.demo import world

MODELS = Path(__file__).resolve().parents[2] / "models" / "demo-lm"


def test_generator_is_deterministic():
    assert world.training_texts(20, seed=3) == world.training_texts(20, seed=3)
    assert world.fact_items(10, seed=5) == world.fact_items(10, seed=5)
    assert world.training_texts(20, seed=3) != world.training_texts(20, seed=4)


def test_checker_on_hand_made_items():
    item = world.FactItem(prompt="the fox is red . what colour is the fox ?", animal="fox", family="color",
                          answer="red", supported=frozenset({"red"}), variant="intact")
    assert world.is_correct(item, "the fox is red .")
    assert not world.is_hallucinated(item, "the fox is red .")
    assert world.is_hallucinated(item, "the fox is blue .")
    assert not world.is_correct(item, "the fox is blue .")


def test_shipped_demo_model_answers_intact_facts():
    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.spec import ModelSpec, SaeSpec
    from sae_runtime.backends.types import SamplingParams, TextRequest

    spec = ModelSpec(name="demo-lm", kind="causal_lm", path=str(MODELS / "model"),
                     saes=(SaeSpec("concepts", str(MODELS / "saes" / "concepts")),), risk_probe=str(MODELS / "risk"))
    backend = CausalLmBackend.from_spec(spec)
    assert backend.saes["concepts"].labels, "the shipped SAE carries concept labels"
    items = [i for i in world.fact_items(40, seed=11) if i.variant == "intact"][:10]
    assert items
    reqs = [backend.validate(TextRequest(prompt=i.prompt, sampling=SamplingParams(max_new_tokens=8))) for i in items]
    results = backend.generate(reqs)
    correct = sum(world.is_correct(i, r.steered.text) for i, r in zip(items, results))
    # Far above chance (about 1 in 6 per family); see the closing note on eval.py reporting 1.00.
    assert correct >= 6, [r.steered.text for r in results]
    assert all(r.risk_final is not None and 0.0 <= r.risk_final.probability <= 1.0 for r in results)
