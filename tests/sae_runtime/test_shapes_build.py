"""A quick shapes build loads back through the user path (LlavaBackend / SdxlTurboBackend.from_spec)
and is reproducible from its seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_runtime.backends.types import ImageRequest, SamplingParams, TextRequest
from sae_runtime.demo import shapes_clamps, shapes_eval as se
from sae_runtime.demo import shapes_world as sw
from sae_runtime.demo.shapes_build import ShapesBuildConfig, build
from sae_runtime.plan import ReadoutSpec


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    torch.set_num_threads(1)
    manifests = build(out, ShapesBuildConfig(threads=1).quick(), log=lambda s: None)
    return out, manifests


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_the_quick_llava_loads_and_answers_with_readouts_and_risk(quick):
    out, manifests = quick
    backend = se.llava_backend(out)
    scene = sw.Scene("red", "circle", "top left")
    [res] = backend.generate([TextRequest(prompt=sw.QUESTIONS["colour"], image=shapes_clamps.png(scene), sampling=SamplingParams(max_new_tokens=2),
                                          readout=ReadoutSpec(saes=("vision", "lm"), top_k=3))])
    assert res.steered.finish_reason in ("eos", "length")  # the quick model is barely trained
    assert res.vision_latents
    assert len(res.vision_latents) == 1 + 4  # CLS + one 16x16 patch per quadrant of the 32x32 image
    assert 0.0 <= res.risk_prompt.probability <= 1.0
    assert backend.saes["vision"].cfg.hook_name == "vision.layers.1"
    assert manifests["demo-llava"]["build_seconds"] > 0


def test_the_quick_sdxl_loads_and_draws_a_32px_image_in_one_step(quick):
    out, _ = quick
    backend = se.sdxl_backend(out)
    [res] = backend.generate_images([ImageRequest(prompt="a big red circle at top left", seed=1, include_default=True,
                                                  readout=ReadoutSpec(saes=("down",), top_k=2))])
    img = se.decode(res.png)
    assert img.shape == (sw.SIDE, sw.SIDE, 3)
    assert np.array_equal(img, se.decode(res.default_png))  # an empty plan changes nothing
    assert res.latent_maps and np.asarray(res.latent_maps[0].values).shape == (8, 8)
    assert set(backend.saes) == {"down", "mid", "up"}


def test_the_same_seed_builds_bit_identical_files(quick, tmp_path):
    out, _ = quick
    again = build(tmp_path, ShapesBuildConfig(threads=1).quick(), log=lambda s: None)
    assert again.keys() == {"demo-llava", "demo-sdxl-turbo"}
    for name in again:
        first, second = _digest(out / name), _digest(tmp_path / name)
        assert first and first == second, name


def test_the_quick_sdxl_saes_carry_their_draws_labels(quick):
    out, manifests = quick
    backend = se.sdxl_backend(out)
    cfg = ShapesBuildConfig().quick()
    for block, rep in manifests["demo-sdxl-turbo"]["saes"].items():
        sae = backend.saes[block]
        for label, d in rep["draws"].items():
            assert label.startswith("draws:") and label.removeprefix("draws:") in sw.COLOURS
            assert sae.labels[label] == d["latent"] and d["share"] >= cfg.effect_min_share
            assert d["value"] == pytest.approx(cfg.effect_mult * d["mean_on"])
        for label, d in rep["labels"].items():  # the caption-concept labels are kept beside them
            assert sae.labels[label] == d["latent"]


def test_assign_draws_takes_the_best_share_first_one_colour_per_latent():
    from sae_runtime.demo.shapes_effects import assign_draws

    prompts = ["red", "red", "blue", "green"]
    drawn = {
        0: [{"green"}, {"green"}, {"green"}, set()],  # green on every prompt that is not green: share 3/3
        1: [{"red"}, {"red"}, {"red"}, set()],  # red on 1 of the 2 non-red prompts (the blue one)
        2: [{"blue"}, {"blue"}, set(), {"blue"}],  # blue: 3/3, ties with latent 0's green; lower latent first
        3: [{"red"}, {"red"}, {"red"}, {"red"}],  # red: 2/2
        4: [set(), set(), set(), set()],  # recolours nothing (a flood or a wiped shape counts as nothing)
    }
    got = assign_draws(drawn, prompts, min_share=0.5)
    assert got == {"green": (0, 1.0), "blue": (2, 1.0), "red": (3, 1.0)}
    # latent 1 (red share 1/2) would label red, had latent 3 not taken it; below min_share nothing is labelled
    assert assign_draws({1: drawn[1], 4: drawn[4]}, prompts, min_share=0.5) == {"red": (1, 0.5)}
    assert assign_draws({1: drawn[1]}, prompts, min_share=0.6) == {}


def test_recoloured_needs_the_colour_and_the_shapes_area():
    scene = sw.Scene("red", "circle", "top left", size="big")
    default = sw.render(scene)
    blue = sw.render(sw.Scene("blue", "circle", "top left", size="big"))
    flood = np.broadcast_to(np.array(sw.COLOURS["blue"], dtype=np.uint8), default.shape).copy()
    empty = np.broadcast_to(np.array(sw.BACKGROUND, dtype=np.uint8), default.shape).copy()
    assert sw.recoloured(blue, default, "blue") and not sw.recoloured(blue, default, "green")
    assert sw.shape_pixels(flood) == sw.SIDE * sw.SIDE and sw.shape_pixels(empty) == 0
    assert sw.dominant_colour(flood) == "blue" and not sw.recoloured(flood, default, "blue")
    assert not sw.recoloured(empty, default, "blue")


def test_the_quick_llava_colour_clamps_are_the_weakest_that_steer_the_selection_images(quick):
    """Re-derive the calibration rule by hand: the recorded multiple is the first in MULTS whose
    selection share reaches 0.9, else the first with the highest share."""
    out, manifests = quick
    cfg = ShapesBuildConfig().quick()
    backend = shapes_clamps.llava_backend(out / "demo-llava", risk=False)
    selection = sw.random_scenes(cfg.clamp_scenes, cfg.seed + 16)
    labels = manifests["demo-llava"]["saes"]["vision"]["labels"]
    colours = [c for c in sw.COLOURS if f"color:{c}" in labels]
    assert colours
    for c in colours:
        lab = labels[f"color:{c}"]
        others = [s for s in selection if s.colour != c]
        shares = [shapes_clamps.steer_effect(backend, c, lab["latent"], m * lab["mean_on"], others)[0] for m in shapes_clamps.MULTS]
        reached = [i for i, s in enumerate(shares) if s >= 0.9]
        expected = reached[0] if reached else shares.index(max(shares))
        assert lab["steer_mult"] == shapes_clamps.MULTS[expected], (c, shares)
        assert lab["selection_share"] == pytest.approx(shares[expected])
        assert lab["steer_value"] == pytest.approx(lab["steer_mult"] * lab["mean_on"])
