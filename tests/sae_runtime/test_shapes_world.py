"""The shapes world: deterministic scenes, images that show what the caption says, noise that hides it."""

from __future__ import annotations

import numpy as np
import pytest

from sae_runtime.demo import shapes_world as sw


def test_scenes_and_images_are_deterministic_from_the_seed():
    a, b = sw.random_scenes(20, 3, noise_levels=(0.0, 0.5)), sw.random_scenes(20, 3, noise_levels=(0.0, 0.5))
    assert a == b and a != sw.random_scenes(20, 4, noise_levels=(0.0, 0.5))
    assert all(np.array_equal(sw.render(x), sw.render(y)) for x, y in zip(a, b))


def test_the_world_covers_every_combination():
    scenes = sw.all_scenes()
    assert len(scenes) == len(sw.COLOURS) * len(sw.SHAPES) * len(sw.POSITIONS) * len(sw.SIZES) >= 6 * 3 * 4
    assert len({s.caption for s in scenes}) == len(scenes)  # a caption determines its image
    assert sw.Scene("red", "circle", "top left", "small").caption == "a small red circle at top left"


@pytest.mark.parametrize("scene", sw.all_scenes()[::7])
def test_a_clean_image_shows_its_colour_in_its_quadrant(scene):
    img = sw.render(scene)
    assert img.shape == (sw.SIDE, sw.SIDE, 3) and img.dtype == np.uint8
    on = (img != np.array(sw.BACKGROUND, dtype=np.uint8)).any(-1)
    assert (img[on] == np.array(sw.COLOURS[scene.colour], dtype=np.uint8)).all()
    ys, xs = np.nonzero(on)
    row, col = scene.position.split()
    h = sw.SIDE // 2
    assert (ys < h).all() if row == "top" else (ys >= h).all()
    assert (xs < h).all() if col == "left" else (xs >= h).all()
    assert sw.dominant_colour(img) == scene.colour


def test_shapes_differ_in_area_as_geometry_says():
    area = {s: sw.shape_mask(sw.Scene("red", s, "top left", "big")).sum() for s in sw.SHAPES}
    r = sw.SIZES["big"]
    # within pixel discretisation (a shape 13 px across) of the continuous areas
    assert abs(area["circle"] - np.pi * r * r) / (np.pi * r * r) < 0.1
    assert abs(area["square"] - (2 * 0.85 * r) ** 2) / (2 * 0.85 * r) ** 2 < 0.2
    assert abs(area["triangle"] - 2 * r * r) / (2 * r * r) < 0.2
    assert area["square"] > area["circle"] > area["triangle"]


def test_noise_replaces_the_requested_fraction_of_pixels():
    for level in (0.0, 0.25, 0.5, 1.0):
        s = sw.Scene("blue", "square", "bottom right", noise=level, noise_seed=5)
        changed = (sw.render(s) != sw.render(sw.Scene("blue", "square", "bottom right"))).any(-1).mean()
        assert changed == pytest.approx(level, abs=0.06)


def test_patch_tags_mark_only_the_patches_the_shape_covers():
    s = sw.Scene("green", "circle", "top left", "big")
    tags = sw.patch_tags(s, 8)
    assert len(tags) == 16
    tagged = [i for i, t in enumerate(tags) if t]
    assert tagged and all(i in (0, 1, 4, 5) for i in tagged)  # the top-left 2x2 patches of a 4x4 grid
    assert tags[tagged[0]] == ("color:green", "shape:circle", "pos:top_left")


def test_questions_and_answers_use_the_world_vocabulary():
    s = sw.Scene("purple", "triangle", "bottom left")
    assert [s.answer(k) for k in sw.QUESTIONS] == ["purple", "triangle", "bottom left"]
    words = set(sw.WORDS)
    for q in sw.QUESTIONS.values():
        assert set(q.split()) <= words
    assert set(s.caption.split()) <= words
