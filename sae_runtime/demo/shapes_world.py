"""The shapes world: RGB images of one coloured shape on a plain background, with ground truth.

Every image shows one shape (``SHAPES``) of one colour (``COLOURS``) at one quadrant
(``POSITIONS``) in one of two sizes, on a dark grey background. From it the world derives

- a caption, ``"a big red circle at top left"`` (what the SDXL-Turbo demo is prompted with; the
  caption determines the image exactly, so a one-step model trained with MSE can reproduce it);
- questions, ``"question : what colour is the shape ? answer :"`` -> ``"red"`` (and the same for
  the shape and the position), what the LLaVA demo answers;
- per-patch concept tags (``color:red``, ``shape:circle``, ``pos:top_left``) for labelling SAE
  latents, on the patches the shape covers;
- noise variants: a fraction ``noise`` in [0, 1] of the pixels replaced with uniform noise, the
  visual analogue of the concept world's uncertainty levels (at 1 the image holds no shape).

Everything is deterministic from a seed (numpy ``default_rng``). Images are (side, side, 3) uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

SIDE = 32
BACKGROUND = (40, 40, 40)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = {"small": 4.5, "big": 6.5}  # half-extent in pixels at SIDE = 32
QUESTIONS = {
    "colour": "question : what colour is the shape ? answer :",
    "shape": "question : what shape is it ? answer :",
    "position": "question : where is the shape ? answer :",
}
NOISE_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Every word of captions, questions and answers (the LLaVA demo's word-level vocabulary).
WORDS = tuple(dict.fromkeys(
    [*COLOURS, *SHAPES, *" ".join(POSITIONS).split(), *SIZES, "a", "at", *" ".join(QUESTIONS.values()).split()]
))


@dataclass(frozen=True)
class Scene:
    """One shape: colour, shape and position names, size name, and a jitter (dy, dx) in pixels."""

    colour: str
    shape: str
    position: str
    size: str = "big"
    jitter: tuple[int, int] = (0, 0)
    noise: float = 0.0
    noise_seed: int = 0

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at {self.position}"

    def answer(self, question: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}[question]

    @property
    def concepts(self) -> tuple[str, ...]:
        return (f"color:{self.colour}", f"shape:{self.shape}", f"pos:{self.position.replace(' ', '_')}")

    def centre(self, side: int = SIDE) -> tuple[float, float]:
        """(y, x) of the shape's centre in pixels."""
        row, col = self.position.split()
        y = side * (0.25 if row == "top" else 0.75) + self.jitter[0]
        x = side * (0.25 if col == "left" else 0.75) + self.jitter[1]
        return y - 0.5, x - 0.5


def shape_mask(scene: Scene, side: int = SIDE) -> np.ndarray:
    """(side, side) bool: the pixels the shape covers."""
    cy, cx = scene.centre(side)
    r = SIZES[scene.size] * side / SIDE
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    if scene.shape == "circle":
        return dy**2 + dx**2 <= r**2
    if scene.shape == "square":
        s = r * 0.85
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if scene.shape == "triangle":  # apex up, base at the bottom
        t = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base row
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    raise ValueError(f"unknown shape {scene.shape!r}")


def render(scene: Scene, side: int = SIDE) -> np.ndarray:
    """The scene as a (side, side, 3) uint8 image, noise applied."""
    img = np.empty((side, side, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    img[shape_mask(scene, side)] = COLOURS[scene.colour]
    if scene.noise > 0:
        rng = np.random.default_rng(scene.noise_seed)
        hit = rng.random((side, side)) < scene.noise
        img[hit] = rng.integers(0, 256, size=(int(hit.sum()), 3), dtype=np.uint8)
    return img


def patch_tags(scene: Scene, patch: int, side: int = SIDE, min_cover: float = 0.25) -> list[tuple[str, ...]]:
    """Concept tags of each ``patch`` x ``patch`` patch, row-major: the scene's concepts where the
    shape covers at least ``min_cover`` of the patch, else none."""
    m = shape_mask(scene, side)
    out = []
    for py in range(0, side, patch):
        for px in range(0, side, patch):
            cover = m[py : py + patch, px : px + patch].mean()
            out.append(scene.concepts if cover >= min_cover else ())
    return out


def all_scenes(size: str | None = None) -> list[Scene]:
    """Every (colour, shape, position, size) combination without jitter or noise, in a fixed order."""
    sizes = [size] if size else list(SIZES)
    return [Scene(c, s, p, z) for c in COLOURS for s in SHAPES for p in POSITIONS for z in sizes]


def random_scenes(n: int, seed: int, *, jitter: int = 1, noise_levels: Sequence[float] = (0.0,)) -> list[Scene]:
    """``n`` scenes drawn uniformly, with jitter in [-jitter, jitter] and a noise level drawn from
    ``noise_levels`` (each scene its own noise seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append(Scene(
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            position=POSITIONS[int(rng.integers(len(POSITIONS)))],
            size=list(SIZES)[int(rng.integers(len(SIZES)))],
            jitter=(int(rng.integers(-jitter, jitter + 1)), int(rng.integers(-jitter, jitter + 1))),
            noise=float(noise_levels[int(rng.integers(len(noise_levels)))]),
            noise_seed=int(rng.integers(2**31)),
        ))
    return out


def _palette_counts(img: np.ndarray) -> np.ndarray:
    """Pixels of ``img`` (H, W, 3) nearest (in RGB) to each colour of COLOURS, in its order; the
    background's pixels are left out."""
    px = img.reshape(-1, 3).astype(np.float64)
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float64)
    nearest = ((px[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    return np.bincount(nearest, minlength=len(palette))[1:]


def dominant_colour(img: np.ndarray, min_pixels: int = 4) -> str | None:
    """The palette colour (nearest in RGB) of most non-background pixels, or None when fewer than
    ``min_pixels`` pixels are far from the background. Used to score generated images."""
    counts = _palette_counts(img)
    if counts.max() < min_pixels:
        return None
    return list(COLOURS)[int(counts.argmax())]


def shape_pixels(img: np.ndarray) -> int:
    """Pixels nearer a shape colour than the background: the drawn shape's area."""
    return int(_palette_counts(img).sum())


def recoloured(img: np.ndarray, default: np.ndarray, colour: str, max_area_ratio: float = 2.0) -> bool:
    """A steered image ``img`` shows the shape of its unsteered twin ``default`` in ``colour``: its
    dominant colour is ``colour`` and its shape's area is within ``max_area_ratio`` of the twin's
    either way (a clamp that floods the image, or wipes the shape out, does not count)."""
    if dominant_colour(img) != colour:
        return False
    a, b = shape_pixels(img), max(shape_pixels(default), 1)
    return 1.0 / max_area_ratio <= a / b <= max_area_ratio


def iter_questions(scenes: Sequence[Scene], seed: int) -> Iterator[tuple[Scene, str]]:
    """(scene, question kind) pairs, one random kind per scene."""
    rng = np.random.default_rng(seed)
    kinds = list(QUESTIONS)
    for s in scenes:
        yield s, kinds[int(rng.integers(len(kinds)))]


__all__ = [
    "BACKGROUND", "COLOURS", "NOISE_LEVELS", "POSITIONS", "QUESTIONS", "SHAPES", "SIDE", "SIZES", "WORDS",
    "Scene", "all_scenes", "dominant_colour", "iter_questions", "patch_tags", "random_scenes", "recoloured", "render", "shape_mask",
    "shape_pixels",
]
