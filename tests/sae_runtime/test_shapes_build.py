"""A quick shapes build loads back through the user path (LlavaBackend / SdxlTurboBackend.from_spec)
and is reproducible from its seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_runtime.backends.types import ImageRequest, SamplingParams, TextRequest
from sae_runtime.demo import shapes_eval as se
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
    [res] = backend.generate([TextRequest(prompt=sw.QUESTIONS["colour"], image=se.png(scene), sampling=SamplingParams(max_new_tokens=2),
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
