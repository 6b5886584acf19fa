"""Label U-Net block SAE latents by what they draw (``draws:<colour>``), through the SDXL-Turbo backend.

A block's ``color:X`` label (:func:`shapes_build.label`) names the latent that fires best with
captions of colour X. Every cell of a block's update carries the prompt, so that latent reads
the colour but need not write it: clamped, most such latents turn every shape green. A
``draws:X`` label names the latent whose clamp most often makes the shape X, measured by
generating: each latent that fires is clamped to ``mult`` x its mean activation where it fires
on a set of selection prompts (fixed seeds, disjoint from the eval's), and per colour the latent
that most often recolours the shape of prompts of other colours to that colour
(:func:`shapes_world.recoloured`: the dominant colour, with the shape's area kept within 2x of the
unsteered image's, so a clamp that floods the image does not count) gets the label, one colour
per latent, when its share reaches ``min_share``. This is how Surkov et al. read SDXL-Turbo's
block features: by turning them on and looking.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import Tensor

from sae_runtime.backends.sdxl_turbo import SdxlTurboBackend
from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec
from sae_runtime.backends.types import ImageRequest
from sae_runtime.demo import shapes_world as sw
from sae_runtime.demo.shapes_sdxl import BLOCKS
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit

SDXL = "demo-sdxl-turbo"
#: Images per backend call.
BATCH = 48


def sdxl_backend(root: str | Path) -> SdxlTurboBackend:
    """The SDXL-Turbo backend of a shapes-world build directory ``root`` (``pipeline/``, ``saes/<block>``)."""
    root = Path(root)
    return SdxlTurboBackend.from_spec(ModelSpec(
        name=SDXL, kind="sdxl_turbo", path=str(root / "pipeline"),
        saes=tuple(SaeSpec(n, str(root / "saes" / n)) for n in BLOCKS), limits=Limits(max_batch_size=BATCH)))


def decode(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PNG."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def generate(backend: SdxlTurboBackend, scenes: Sequence[sw.Scene], seeds: Sequence[int], plan: InterventionPlan = InterventionPlan()) -> list[np.ndarray]:
    """One-step images (H, W, 3) of the scenes' captions, one seed each, under ``plan``."""
    out: list[np.ndarray] = []
    for s in range(0, len(scenes), BATCH):
        reqs = [ImageRequest(prompt=sc.caption, seed=int(sd), plan=plan) for sc, sd in zip(scenes[s : s + BATCH], seeds[s : s + BATCH])]
        out += [decode(r.png) for r in backend.generate_images(reqs)]
    return out


def drawn_colours(backend: SdxlTurboBackend, block: str, latent: int, value: float, scenes: Sequence[sw.Scene],
                  seeds: Sequence[int], defaults: Sequence[np.ndarray]) -> list[set[str]]:
    """Per scene, the colours its shape counts as recoloured to (:func:`shapes_world.recoloured`
    against ``defaults``, the unsteered images) with ``latent`` of ``block`` set to ``value``: a
    set of at most one colour."""
    plan = InterventionPlan(edits=(LatentEdit(sae=block, op=EditOp.SET, latents=(latent,), value=value),))
    out = []
    for img, d in zip(generate(backend, scenes, seeds, plan), defaults):
        c = sw.dominant_colour(img)  # the only colour the shape can count as recoloured to
        out.append({c} if c is not None and sw.recoloured(img, d, c) else set())
    return out


def assign_draws(drawn: Mapping[int, Sequence[set[str]]], prompt_colours: Sequence[str], min_share: float) -> dict[str, tuple[int, float]]:
    """{colour: (latent, share)} from ``drawn`` (latent -> per prompt, the colours it was recoloured to).

    A latent's share for colour c is the fraction of prompts whose colour is not c that came out c.
    Pairs are taken best share first (ties: lower latent, then palette order); each colour and each
    latent is used once; shares below ``min_share`` give no label.
    """
    pairs = []
    for c in sw.COLOURS:
        others = [i for i, pc in enumerate(prompt_colours) if pc != c]
        if not others:
            continue
        for j, got in drawn.items():
            pairs.append((sum(c in got[i] for i in others) / len(others), c, j))
    order = {c: i for i, c in enumerate(sw.COLOURS)}
    pairs.sort(key=lambda p: (-p[0], p[2], order[p[1]]))
    out: dict[str, tuple[int, float]] = {}
    used: set[int] = set()
    for share, c, j in pairs:
        if share < min_share:
            break
        if c not in out and j not in used:
            out[c] = (j, float(share))
            used.add(j)
    return out


def draw_labels(backend: SdxlTurboBackend, block: str, mean_on: Tensor, scenes: Sequence[sw.Scene], seeds: Sequence[int],
                mult: float, min_share: float) -> dict[str, dict[str, Any]]:
    """``{"draws:<colour>": {latent, share, mean_on, value}}`` for ``block`` (module doc); ``mean_on``
    (d_sae,) is each latent's mean activation where it fires (0 for latents that never fire)."""
    defaults = generate(backend, scenes, seeds)
    drawn = {j: drawn_colours(backend, block, j, float(mult * mean_on[j]), scenes, seeds, defaults)
             for j in range(mean_on.numel()) if float(mean_on[j]) > 0}
    chosen = assign_draws(drawn, [s.colour for s in scenes], min_share)
    return {f"draws:{c}": {"latent": j, "share": round(share, 3), "mean_on": float(mean_on[j]), "value": float(mult * mean_on[j])}
            for c, (j, share) in sorted(chosen.items())}


__all__ = ["assign_draws", "decode", "draw_labels", "drawn_colours", "generate", "sdxl_backend"]
