"""The shapes-world LLaVA through its backend; its vision SAE's colour clamps found by their effect.

A ``color:X`` label (:func:`.shapes_build.label`) names the latent that fires best on images of
colour X. Firing is not steering: such a latent is often a colour-shape conjunction, and clamped
it turns the colour answer to X and the shape answer to its shape. So the build also reads the
vision latents as Surkov et al. read SDXL-Turbo's, by turning them on and looking, on selection
images of its own (clean, other colours, disjoint from the eval's), every clamp set on all
vision positions without the error term (the VLM steering paper's setting):

- strength: a latent's mean activation where it fires says little about how hard it must be
  clamped (one latent turns the answers at 4x it, another needs 12x); :func:`weakest_clamp` takes
  the smallest multiple in ``MULTS`` at which the colour answers become X on ``min_share`` of the
  images. Every ``color:X`` label gets its strength so (:func:`calibrate`).
- ``says:X`` (:func:`says_labels`): among the latents that fire mostly on X, the one that at its
  weakest clamp makes LLaVA say X and keeps the most shape answers right.

The eval reports both on held-out images: ``says:X`` is the headline, ``color:X`` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from sae_runtime.backends.images import encode_png
from sae_runtime.backends.llava import LlavaBackend
from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec
from sae_runtime.backends.types import SamplingParams, TextRequest
from sae_runtime.demo import shapes_world as sw
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, Scope

LLAVA = "demo-llava"
#: Requests per backend call.
BATCH = 16
#: Clamp strengths tried, as multiples of a latent's mean activation where it fires.
MULTS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def llava_backend(root: str | Path, risk: bool = True) -> LlavaBackend:
    """The LLaVA backend of a shapes-world build directory ``root`` (``model/``, ``saes/``, ``risk/``)."""
    root = Path(root)
    return LlavaBackend.from_spec(ModelSpec(
        name=LLAVA, kind="llava", path=str(root / "model"), risk_probe=str(root / "risk") if risk else None,
        saes=(SaeSpec("vision", str(root / "saes" / "vision")), SaeSpec("lm", str(root / "saes" / "lm"))),
        limits=Limits(max_batch_size=BATCH, max_new_tokens=4)))


def png(scene: sw.Scene) -> bytes:
    from PIL import Image

    return encode_png(Image.fromarray(sw.render(scene)))


def answers(backend: LlavaBackend, scenes: Sequence[sw.Scene], kind: str, plan: InterventionPlan = InterventionPlan(),
            **extra: Any) -> list[Any]:
    """TextResults of greedy answers to ``kind`` questions about ``scenes``."""
    reqs = [TextRequest(prompt=sw.QUESTIONS[kind], image=png(s), plan=plan, sampling=SamplingParams(max_new_tokens=3), **extra)
            for s in scenes]
    out = []
    for i in range(0, len(reqs), BATCH):
        out += backend.generate(reqs[i : i + BATCH])
    return out


def clamp(sae: str, label: str, value: float, preserve_error: bool = True, mask: torch.Tensor | None = None) -> InterventionPlan:
    return InterventionPlan(edits=(LatentEdit(sae=sae, op=EditOp.SET, labels=(label,), value=value),),
                            scope=Scope(mask=mask), preserve_error=preserve_error)


def steer_effect(backend: LlavaBackend, colour: str, latent: int, value: float, scenes: Sequence[sw.Scene]) -> tuple[float, float]:
    """(share of colour answers equal to ``colour``, share of shape answers kept right) over
    ``scenes`` with vision ``latent`` set to ``value`` on every vision position, no error term."""
    plan = InterventionPlan(edits=(LatentEdit(sae="vision", op=EditOp.SET, latents=(latent,), value=value),), preserve_error=False)
    said = answers(backend, scenes, "colour", plan)
    kept = answers(backend, scenes, "shape", plan)
    return (float(np.mean([r.steered.text.split()[:1] == [colour] for r in said])),
            float(np.mean([r.steered.text.split()[:1] == [s.shape] for r, s in zip(kept, scenes)])))


def weakest_clamp(backend: LlavaBackend, colour: str, latent: int, mean_on: float, scenes: Sequence[sw.Scene],
                  min_share: float) -> dict[str, float]:
    """The smallest multiple in ``MULTS`` of ``mean_on`` at which clamping ``latent`` makes at least
    ``min_share`` of the colour answers about ``scenes`` (other colours) ``colour``; the multiple
    with the highest share if none does. ``{steer_mult, steer_value, selection_share, selection_kept}``."""
    best = None
    for mult in MULTS:
        share, kept = steer_effect(backend, colour, latent, mult * mean_on, scenes)
        if best is None or share > best[0]:
            best = (share, kept, mult)
        if share >= min_share:
            break
    share, kept, mult = best
    return {"steer_mult": mult, "steer_value": mult * mean_on, "selection_share": share, "selection_kept": kept}


def calibrate(backend: LlavaBackend, labels: Mapping[str, Mapping[str, Any]], scenes: Sequence[sw.Scene],
              min_share: float = 0.9) -> dict[str, dict[str, float]]:
    """:func:`weakest_clamp` of each ``color:X`` of ``labels`` (the vision SAE's label table, with
    ``latent`` and ``mean_on``), on the ``scenes`` of other colours."""
    return {f"color:{c}": weakest_clamp(backend, c, labels[f"color:{c}"]["latent"], labels[f"color:{c}"]["mean_on"],
                                        [s for s in scenes if s.colour != c], min_share)
            for c in sw.COLOURS if f"color:{c}" in labels}


def says_labels(backend: LlavaBackend, latents: torch.Tensor, colours: Sequence[str], scenes: Sequence[sw.Scene],
                min_share: float = 0.9, min_precision: float = 0.5, min_recall: float = 0.1) -> dict[str, dict[str, float]]:
    """``{"says:X": {latent, precision, recall, mean_on, steer_mult, steer_value, selection_share,
    selection_kept}}``: per colour X, among the latents that fire mostly on X (``latents`` (N,
    d_sae) of patches whose image has colour ``colours[i]``: precision >= ``min_precision``,
    recall >= ``min_recall``), the one whose :func:`weakest_clamp` reaches ``min_share`` and keeps
    the most shape answers right on ``scenes`` (ties: higher share, then lower latent)."""
    fires = latents > 0
    mean_on = torch.where(fires, latents, 0).sum(0) / fires.sum(0).clamp(min=1)
    out = {}
    for c in sw.COLOURS:
        is_c = torch.tensor([x == c for x in colours])
        hits = (fires & is_c[:, None]).sum(0).float()
        precision, recall = hits / fires.sum(0).clamp(min=1), hits / is_c.sum().clamp(min=1)
        others = [s for s in scenes if s.colour != c]
        found = []
        for j in torch.nonzero((precision >= min_precision) & (recall >= min_recall)).flatten().tolist():
            eff = weakest_clamp(backend, c, j, float(mean_on[j]), others, min_share)
            if eff["selection_share"] >= min_share:
                found.append((-eff["selection_kept"], -eff["selection_share"], j, eff))
        if found:
            _, _, j, eff = min(found)
            out[f"says:{c}"] = {"latent": j, "precision": round(float(precision[j]), 3), "recall": round(float(recall[j]), 3),
                                "mean_on": float(mean_on[j]), **eff}
    return out


__all__ = ["BATCH", "LLAVA", "MULTS", "answers", "calibrate", "clamp", "llava_backend", "png", "says_labels", "steer_effect", "weakest_clamp"]
