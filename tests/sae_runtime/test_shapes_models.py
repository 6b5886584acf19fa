"""The shipped shapes demos (models/demo-llava, models/demo-sdxl-turbo) on a small held-out sample,
through the backends the service runs: they answer and draw what the world says, and their
labelled SAE latents steer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sae_runtime.backends.types import ImageRequest
from sae_runtime.demo import shapes_eval as se
from sae_runtime.demo import shapes_world as sw

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def llava():
    return se.llava_backend(MODELS)


@pytest.fixture(scope="module")
def sdxl():
    return se.sdxl_backend(MODELS)


def _manifest(name: str) -> dict:
    return json.loads((MODELS / name / "manifest.json").read_text())


def _labels(name: str, sae: str) -> dict:
    return _manifest(name)["saes"][sae]["labels"]


def test_the_llava_demo_answers_colour_and_shape_on_held_out_images(llava):
    scenes = sw.random_scenes(24, 91_001)
    for kind, floor in (("colour", 0.9), ("shape", 0.8)):
        res = se.answers(llava, scenes, kind)
        acc = np.mean([se.correct(r.steered.text, s, kind) for r, s in zip(res, scenes)])
        assert acc >= floor, (kind, acc, [r.steered.text for r in res])


@pytest.mark.parametrize("colour", ["yellow", "cyan"])
def test_clamping_a_vision_says_latent_changes_the_colour_answer_and_not_the_shape(llava, colour):
    """``says:X`` (chosen by its effect on the build's selection images) at its calibrated value, on
    held-out images of other colours: the colour answer turns X, the shape answer stays."""
    says = _manifest("demo-llava")["saes"]["vision"]["says"][f"says:{colour}"]
    scenes = [s for s in sw.random_scenes(40, 91_002) if s.colour != colour][:12]
    plan = se.clamp("vision", f"says:{colour}", says["steer_value"], preserve_error=False)
    said = se.answers(llava, scenes, "colour", plan)
    assert np.mean([r.steered.text.split()[:1] == [colour] for r in said]) >= 0.75
    unsteered = se.answers(llava, scenes, "colour")
    assert all(r.steered.text.split()[:1] == [s.colour] for r, s in zip(unsteered, scenes))
    shape = se.answers(llava, scenes, "shape", plan)
    assert np.mean([se.correct(r.steered.text, s, "shape") for r, s in zip(shape, scenes)]) >= 0.75


def test_the_vision_says_labels_are_the_sae_latents_the_manifest_names(llava):
    vision = _manifest("demo-llava")["saes"]["vision"]
    assert set(vision["says"]) == {f"says:{c}" for c in sw.COLOURS}
    for label, d in vision["says"].items():
        assert llava.saes["vision"].labels[label] == d["latent"]
        assert d["steer_value"] == pytest.approx(d["steer_mult"] * d["mean_on"])
        assert d["selection_share"] >= 0.9 and d["precision"] >= 0.5


def test_the_risk_probe_scores_noise_images_above_clean_ones(llava):
    clean = se.answers(llava, sw.random_scenes(8, 91_003), "colour")
    noise = se.answers(llava, sw.random_scenes(8, 91_004, noise_levels=(1.0,)), "colour")
    assert np.mean([r.risk_prompt.probability for r in noise]) > np.mean([r.risk_prompt.probability for r in clean]) + 0.3


def test_the_sdxl_demo_draws_the_prompted_colour_in_one_step(sdxl):
    scenes = sw.all_scenes()[::12]
    res = sdxl.generate_images([ImageRequest(prompt=s.caption, seed=91_005 + i) for i, s in enumerate(scenes)])
    acc = np.mean([sw.dominant_colour(se.decode(r.png)) == s.colour for r, s in zip(res, scenes)])
    assert acc >= 0.9, acc


def test_clamping_the_up_blocks_green_latent_recolours_the_shape(sdxl):
    # The caption-labelled latent of the colour it steers best (see docs/demo_eval.json).
    labels = _labels("demo-sdxl-turbo", "up")
    scenes = [s for s in sw.all_scenes() if s.colour != "green"][::20]
    plan = se.clamp("up", "color:green", se.IMAGE_STEER_MULT * labels["color:green"]["mean_on"])
    res = sdxl.generate_images([ImageRequest(prompt=s.caption, seed=91_006 + i, plan=plan, include_default=True) for i, s in enumerate(scenes)])
    assert np.mean([sw.dominant_colour(se.decode(r.png)) == "green" for r in res]) >= 0.6
    assert np.mean([sw.dominant_colour(se.decode(r.default_png)) == s.colour for r, s in zip(res, scenes)]) >= 0.8


@pytest.mark.parametrize("colour", ["green", "yellow"])
def test_the_up_blocks_draws_labels_recolour_held_out_prompts(sdxl, colour):
    """``draws:X`` (labelled by what the latent draws on the build's selection prompts) on prompts of
    other colours and seeds the build never used."""
    draws = json.loads((MODELS / "demo-sdxl-turbo" / "manifest.json").read_text())["saes"]["up"]["draws"]
    label = f"draws:{colour}"
    scenes = [s for s in sw.all_scenes() if s.colour != colour][3::15]
    plan = se.clamp("up", label, draws[label]["value"])
    res = sdxl.generate_images([ImageRequest(prompt=s.caption, seed=91_007 + i, plan=plan, include_default=True) for i, s in enumerate(scenes)])
    assert np.mean([sw.recoloured(se.decode(r.png), se.decode(r.default_png), colour) for r in res]) >= 0.7


def test_risk_gated_abstention_on_the_llava_demo_halves_wrong_colours_and_the_engine_agrees():
    """The shipped LLaVA probe gates abstention: on noisy images fewer wrong colours, clean images
    still answered; the engine's own mitigation gives exactly the answers the curve assumes."""
    from sae_runtime.demo import shapes_mitigation as sm

    report = sm.evaluate(MODELS, n_mixed=88, n_intact=32, n_calibration=88, log=lambda *_: None)
    assert report["engine_agrees"] == 1.0
    assert report["halluc_rate"] > 0.1  # noisy images do make it answer wrong colours
    assert report["halluc_rate_mitigated"] <= 0.5 * report["halluc_rate"]
    assert report["fact_accuracy_mitigated"] >= 0.9


def test_patch_embedding_is_the_multi_hot_of_the_patch_concepts_plus_a_background_unit():
    from sae_runtime.demo.shapes_dictionary import patch_embedding

    e = patch_embedding([("color:red", "shape:circle"), (), ("shape:circle",)], ["color:red", "shape:circle"])
    assert e.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_the_vision_sae_spliced_in_keeps_the_answers_and_zeroing_the_layer_loses_them(llava):
    from sae_runtime.demo.shapes_dictionary import answer_loss_recovered

    scenes = sw.random_scenes(24, se.EVAL_SEED + 3)
    r = answer_loss_recovered(llava.model, llava.processor, llava.saes["vision"], scenes)
    assert r["loss_clean"] < r["loss_with_dict"] < 0.5 < r["loss_zero_ablated"]  # the splice is applied, and costs little
    expected = (r["loss_zero_ablated"] - r["loss_with_dict"]) / (r["loss_zero_ablated"] - r["loss_clean"])
    assert r["loss_recovered"] == pytest.approx(expected) and r["loss_recovered"] > 0.9
