"""The shapes world's LLaVA vision SAE measured like the demo LM's dictionaries (issue 13).

``dictionaries.vision`` in the report, the keys of :func:`sae_runtime.demo.dictionaries.measure`
where they apply to images, all on held-out scenes (``shapes_eval.EVAL_SEED``):

- reconstruction (every vision position, CLS included, clean and noisy images): ``l0``, ``fvu``,
  dead / dense shares; ``loss_recovered``: the cross-entropy of the right first answer word to the
  colour, shape and position questions about clean images, with the SAE's reconstruction
  replacing the vision layer (no error term) against zeroing it;
- ``ms_mean``: MS over the image patches; the separate "encoder" is the world's **ground truth**
  per patch: the multi-hot of the concepts of the shape it shows (colour, shape, position), or a
  single "background" unit for an empty patch. The images are synthetic, so their
  attributes are exactly known and independent of LLaVA; a pretrained image encoder (the paper's
  choice) would embed 32x32 renders it never saw;
- ``fms_at_1`` / ``fms_at_5`` over the patch concept tags; ``absorption_fraction`` /
  ``full_absorption_rate`` for the parent ``is:shape`` (the patch shows the shape), whose
  children are the 6 colours x 3 shapes;
- ``steer_share`` / ``steer_specificity`` are ``vlm_steer_share`` / ``vlm_steer_specificity``
  (the same clamp, measured in :mod:`.shapes_eval`); ``steer_well_formed`` is the share of the
  clamped colour answers that are a colour word.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from sae_runtime.demo import shapes_world as sw

PARENT = "is:shape"


def patch_embedding(tags: Sequence[Sequence[str]], names: Sequence[str]) -> Tensor:
    """(N, C + 1) ground truth per patch: multi-hot of its concepts, last unit = background."""
    col = {c: j for j, c in enumerate(names)}
    e = torch.zeros(len(tags), len(names) + 1)
    for i, ts in enumerate(tags):
        for t in ts:
            e[i, col[t]] = 1.0
        if not ts:
            e[i, -1] = 1.0
    return e


def answer_loss_recovered(model: Any, processor: Any, sae: Any, scenes: Sequence[sw.Scene]) -> dict[str, float]:
    """Loss recovered on the first answer word of every question kind (clean, spliced, zero-ablated CE)."""
    from sae_runtime.demo import shapes_llava as sl
    from sae_runtime.demo.shapes_build import prompt_forward
    from sae_runtime.metrics import dictionary_outputs
    from sae_runtime.sites import HookSite, attached

    site = HookSite.parse(sl.VISION_SITE)
    tok = processor.tokenizer

    def splice(x: Tensor, grid: Any) -> Tensor:
        return dictionary_outputs(sae, x.reshape(-1, x.shape[-1]).float())[1].reshape(x.shape).to(x.dtype)

    def zero(x: Tensor, grid: Any) -> Tensor:
        return torch.zeros_like(x)

    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    for kind in sw.QUESTIONS:
        target = torch.tensor([tok.convert_tokens_to_ids(s.answer(kind).split()[0]) for s in scenes])
        for name, fn in (("clean", None), ("spliced", splice), ("zero", zero)):
            with attached(model, [(site, fn)] if fn else []):
                logits = prompt_forward(model, processor, scenes, kind)[2]
            ce[name] += float(torch.nn.functional.cross_entropy(logits.float(), target)) / len(sw.QUESTIONS)
    return {"loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
            "loss_clean": ce["clean"], "loss_with_dict": ce["spliced"], "loss_zero_ablated": ce["zero"]}


def measure_vision(model: Any, processor: Any, sae: Any, n_images: int, seed: int) -> dict[str, Any]:
    """The ``dictionaries.vision`` figures (see the module doc) on ``n_images`` held-out scenes per set."""
    from sae_runtime.demo import shapes_llava as sl
    from sae_runtime.demo.shapes_build import vision_acts
    from sae_runtime.metrics import dictionary_outputs, reconstruction_metrics, target_of
    from sae_runtime.metrics.absorption import absorption
    from sae_runtime.metrics.fms import fms
    from sae_runtime.metrics.ms import monosemanticity, summarise

    noisy = sw.random_scenes(n_images, seed, noise_levels=sw.NOISE_LEVELS)
    x = vision_acts(model, processor, noisy)
    rec = reconstruction_metrics(sae, x.reshape(-1, x.shape[-1]).float())
    clean = sw.random_scenes(n_images, seed + 1)
    patches = vision_acts(model, processor, clean)[:, 1:].reshape(-1, x.shape[-1]).float()  # CLS has no place
    tags = [t for s in clean for t in sl.patch_concepts(s)]
    covered = torch.tensor([bool(ts) for s in clean for ts in sw.patch_tags(s, sl.PATCH)])  # the patch shows the shape
    names = sorted({t for ts in tags for t in ts})
    f, _ = dictionary_outputs(sae, patches)
    ms = summarise(monosemanticity(f, patch_embedding(tags, names)))
    y = {c: torch.tensor([c in ts for ts in tags]) for c in names}
    fms_report = fms(f, y)
    ab = absorption(target_of(sae, patches), f, sae.decoder_rows().detach(), {PARENT: covered})
    return {
        "architecture": sae.cfg.architecture, "d_sae": sae.d_sae, "hook_name": sae.cfg.hook_name,
        "l0": rec.l0, "fvu": rec.fvu, "dead_share": rec.dead_share, "dense_share": rec.dense_share,
        **answer_loss_recovered(model, processor, sae, clean),
        "ms_mean": ms.mean, "ms_std": ms.std, "ms_scored": ms.n_scored, "ms_encoder": "ground truth per patch",
        "fms_at_1": fms_report.fms_at_1, "fms_at_5": fms_report.fms_at_5,
        "fms_per_concept": fms_report.to_dict()["per_concept"],
        "absorption_fraction": ab.absorption_fraction, "full_absorption_rate": ab.full_absorption_rate,
        "absorption_per_parent": ab.to_dict()["per_parent"],
        "n_positions": int(x.shape[0] * x.shape[1]), "n_patches": int(patches.shape[0]),
    }  # fmt: skip


__all__ = ["PARENT", "answer_loss_recovered", "measure_vision", "patch_embedding"]
