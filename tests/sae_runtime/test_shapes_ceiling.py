"""The single-direction ceiling of the shipped shapes SDXL-Turbo (sae_runtime/demo/shapes_ceiling.py):
the measurements behind the README's account of image_steer_share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_runtime.demo import shapes_ceiling as sc
from sae_runtime.demo import shapes_world as sw
from sae_runtime.demo.shapes_effects import generate, sdxl_backend
from sae_runtime.demo.shapes_sdxl import BLOCKS
from sae_runtime.plan import EditOp, InterventionPlan, VectorEdit
from sae_runtime.sites import HookSite

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def backend():
    return sdxl_backend(MODELS / "demo-sdxl-turbo")


def _scenes(colour: str, n: int, seed: int) -> list[sw.Scene]:
    return sc.other_colour(sw.all_scenes(), colour, n, np.random.default_rng(seed))


def test_the_up_blocks_update_decides_the_colour_on_its_own(backend):
    scenes = _scenes("red", 8, 1)
    assert sc.patch_share(backend.pipe, BLOCKS["up"], "red", scenes, range(500, 508)) >= 0.85
    # the control: an update patched from the same captions keeps every shape's colour
    same = [s.colour for s in scenes]
    hook = HookSite.parse(BLOCKS["up"])
    kept: list[torch.Tensor] = []
    sc.one_step_images(backend.pipe, [s.caption for s in scenes], range(500, 508), [(hook, lambda x, g: kept.append(x.clone()))])
    patched = sc.one_step_images(backend.pipe, [s.caption for s in scenes], range(500, 508), [(hook, lambda x, g: kept[0])])
    assert [sw.dominant_colour(im) for im in patched] == same


def test_a_vector_edit_through_the_backend_adds_the_direction_at_every_cell_of_the_block(backend):
    """The backend's VectorEdit (what direction_share scores) equals adding d by hand at the site."""
    scenes = _scenes("blue", 4, 2)
    d = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    plan = InterventionPlan(vectors=(VectorEdit(values=tuple(float(v) for v in d), site=BLOCKS["up"], op=EditOp.ADD, value=0.5),))
    served = generate(backend, scenes, [11, 12, 13, 14], plan)
    by_hand = sc.one_step_images(backend.pipe, [s.caption for s in scenes], [11, 12, 13, 14],
                                 [(HookSite.parse(BLOCKS["up"]), lambda x, g: x + 0.5 * d)])
    plain = generate(backend, scenes, [11, 12, 13, 14])
    for a, b, c in zip(served, by_hand, plain):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0  # the edit changed the image


def test_the_direction_search_lowers_the_pixel_loss_and_a_zero_direction_recolours_nothing(backend):
    pool = [s for s in sw.all_scenes() if s.colour != "yellow"]
    d, losses = sc.optimise_direction(backend.pipe, BLOCKS["up"], "yellow", pool, steps=12, batch=4, seed=3)
    assert d.shape == (64,) and torch.isfinite(d).all()
    assert np.mean(losses[-3:]) < 0.8 * losses[0]
    scenes = _scenes("yellow", 6, 4)
    assert sc.direction_share(backend, "up", torch.zeros(64), "yellow", scenes, range(6)) == 0.0
