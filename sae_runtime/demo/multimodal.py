"""Mechanics demos for the LLaVA and SDXL-Turbo backends: tiny RANDOM models built at first start.

Nothing is downloaded. :func:`ensure_llava_demo` and :func:`ensure_sdxl_demo` build, from a fixed
seed, a tiny LlavaForConditionalGeneration (:func:`sae_runtime.demo.tiny_models.build_tiny_llava`)
or a tiny StableDiffusionXLPipeline (:func:`sae_runtime.demo.tiny_sdxl.save_tiny_sdxl`), collect
the model's own activations on synthetic inputs, train small top-k SAEs on them for a few hundred
steps (:func:`sae_runtime.training.trainer.train_sae`), label latents with simple concepts where
the data supports it, and save everything (safetensors + JSON) under a cache directory. Later
starts find the cached build (a ``manifest.json`` with the same seed and format version) and only
return its :class:`~sae_runtime.backends.spec.ModelSpec`.

The weights are random: images and text these models produce mean nothing. What is real is the
machinery (hooks, per-request edits, readouts, heatmaps), and the SAEs really are trained on the
models' activations (their L0 / FVU are in the manifest). The specs' descriptions say so.

Synthetic data:
- LLaVA vision SAE (``vision.layers.1``, what the projector reads): 16x16 images, a square of
  one palette colour on a background of another; each 4x4 patch is tagged with its majority
  colour, and latents are labelled ``color:<name>`` from patch-level precision/recall.
- LLaVA language SAE (``blocks.0.hook_resid_post``): image + question prompts from the tiny
  tokenizer's word list (no labels).
- SDXL SAEs (``unet.mid_block.attentions.0``, ``unet.up_blocks.0.attentions.1``): block updates
  of 1- and 2-step generations for "a <colour> <object>" prompts; latents labelled ``color:<name>``
  when an image's top latents track the prompt's colour.

Builds go to a temporary sibling directory that is renamed into place when complete, so a crash
never leaves a half-built cache and concurrent starts do not corrupt each other.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sae_runtime.backends.spec import ModelSpec, SaeSpec

FORMAT_VERSION = 1
LLAVA_NAME = "demo-llava"
SDXL_NAME = "demo-sdxl-turbo"
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
OBJECTS = ("cat", "dog", "bird", "fish", "car", "tree", "house", "sun")
VISION_SITE = "vision.layers.1"
LM_SITE = "blocks.0.hook_resid_post"
SDXL_SITES = {"mid": "unet.mid_block.attentions.0", "up0_1": "unet.up_blocks.0.attentions.1"}


@dataclass(frozen=True)
class DemoSize:
    """How much data and training a demo build uses (tests shrink it)."""

    images: int = 512  # LLaVA vision images
    prompts: int = 192  # LLaVA language prompts
    sdxl_prompts: int = 48
    steps: int = 300  # SAE training steps
    batch_size: int = 256
    d_sae: int = 128
    k: int = 8


def default_cache_dir() -> Path:
    """``$SAE_DEMO_CACHE`` or ``~/.cache/sae-steering/multimodal``."""
    env = os.environ.get("SAE_DEMO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sae-steering" / "multimodal"


# -- caching ------------------------------------------------------------------------------------
def _cached(cache_dir: Path | str | None, name: str, seed: int, build: Callable[[Path], dict[str, Any]]) -> Path:
    """The build directory for (name, seed), building it with ``build(tmp_dir)`` when absent."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{name}-seed{seed}-v{FORMAT_VERSION}"
    if _complete(final, seed):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    manifest = build(tmp)
    manifest.update(format_version=FORMAT_VERSION, seed=seed, name=name, build_seconds=round(time.perf_counter() - started, 2))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if final.exists() and not _complete(final, seed):
        shutil.rmtree(final, ignore_errors=True)  # a stale or broken build
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first: keep its build
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(final, seed):
            raise
    return final


def _complete(path: Path, seed: int) -> bool:
    try:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return m.get("format_version") == FORMAT_VERSION and m.get("seed") == seed


def read_manifest(path: Path | str) -> dict[str, Any]:
    return json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))


def _train(acts: Tensor, hook: str, model_name: str, size: DemoSize, seed: int):
    from sae_runtime.training.trainer import TrainConfig, train_sae

    cfg = TrainConfig(architecture="topk", d_sae=size.d_sae, k=size.k, steps=size.steps,
                      batch_size=min(size.batch_size, acts.shape[0]), seed=seed, log_every=max(size.steps // 4, 1))
    result = train_sae(acts.float(), cfg, hook_name=hook, model_name=model_name, progress=False)
    m = result.report.final
    return result.sae, {"hook_name": hook, "architecture": "topk", "d_sae": size.d_sae, "k": size.k, "steps": size.steps,
                        "rows": int(acts.shape[0]), "l0": round(m.l0, 3), "fvu": round(m.fvu, 4),
                        "dead_fraction": round(m.dead_fraction, 4)}


def _label(sae, fires: Tensor, tags: Sequence[set[str]], min_f1: float) -> dict[str, Any]:
    """Label latents with concepts (best F1 per concept, at least ``min_f1``); a latent that is the
    best match of several concepts keeps only its best one, so every label names a distinct latent."""
    from sae_runtime.training.labelling import label_table

    table = label_table(fires, tags, min_f1=min_f1)
    best: dict[int, Any] = {}
    for r in table.by_concept:
        if r.latent not in best or r.f1 > best[r.latent].f1:
            best[r.latent] = r
    kept = [r for r in table.by_concept if best[r.latent] is r]
    sae.labels.update({r.concept: r.latent for r in kept})
    return {r.concept: {"latent": r.latent, "precision": round(r.precision, 3), "recall": round(r.recall, 3), "f1": round(r.f1, 3)}
            for r in kept}


# -- LLaVA ----------------------------------------------------------------------------------------
def synthetic_images(n: int, seed: int, side: int = 16, patch: int = 4) -> tuple[list[np.ndarray], list[list[set[str]]]]:
    """``n`` images (side, side, 3) uint8 with a square of one palette colour on another, and per
    image the colour tags of each patch (row-major, CLS excluded)."""
    rng = np.random.default_rng(seed)
    names = list(PALETTE)
    images, tags = [], []
    for _ in range(n):
        bg, fg = rng.choice(len(names), size=2, replace=False)
        colours = np.full((side, side), bg)
        s = int(rng.integers(side // 4, side // 2 + 1))
        y, x = (int(v) for v in rng.integers(0, side - s + 1, size=2))
        colours[y : y + s, x : x + s] = fg
        img = np.array([PALETTE[names[c]] for c in colours.ravel()], dtype=np.uint8).reshape(side, side, 3)
        images.append(img)
        per_patch = []
        for py in range(0, side, patch):
            for px in range(0, side, patch):
                block = colours[py : py + patch, px : px + patch].ravel()
                per_patch.append({f"color:{names[int(np.bincount(block).argmax())]}"})
        tags.append(per_patch)
    return images, tags


def _llava_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed + 1)
    templates = ("what is the {o}", "is the {o} {c}", "what color is the {o}", "the {c} {o} is big", "where is the {o}")
    return [templates[int(rng.integers(len(templates)))].format(o=OBJECTS[int(rng.integers(len(OBJECTS)))],
                                                                c=list(PALETTE)[int(rng.integers(len(PALETTE)))])
            for _ in range(n)]


def _build_llava(out: Path, seed: int, size: DemoSize) -> dict[str, Any]:
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sae_runtime.demo.tiny_models import build_tiny_llava
    from sae_runtime.formats import save_native
    from sae_runtime.sites import HookSite, attached

    model_dir = build_tiny_llava(out / "model", seed=seed)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    torch.manual_seed(seed)
    images, patch_tags = synthetic_images(size.images, seed)
    pil = [Image.fromarray(a) for a in images]

    grabbed: list[Tensor] = []
    with torch.no_grad(), attached(model, [(HookSite.parse(VISION_SITE), lambda x, grid: grabbed.append(x.detach().clone()))]):
        for s in range(0, len(pil), 128):
            pv = processor.image_processor(pil[s : s + 128], return_tensors="pt")["pixel_values"]
            model.model.vision_tower(pixel_values=pv)
    vision = torch.cat(grabbed)  # (images, 1 + patches, d)
    vis_sae, vis_report = _train(vision.reshape(-1, vision.shape[-1]), VISION_SITE, LLAVA_NAME, size, seed)
    with torch.no_grad():
        fires = vis_sae.encode(vision[:, 1:].reshape(-1, vision.shape[-1])) > 0  # patches only: CLS has no colour
    vis_report["labels"] = _label(vis_sae, fires, [t for per in patch_tags for t in per], min_f1=0.2)

    prompts = _llava_prompts(size.prompts, seed)
    rows: list[Tensor] = []
    with torch.no_grad():
        for s in range(0, len(prompts), 32):
            batch = [f"<image>\n{p}" for p in prompts[s : s + 32]]
            imgs = [pil[(s + i) % len(pil)] for i in range(len(batch))]
            enc = processor(images=imgs, text=batch, return_tensors="pt", padding=True)
            got: list[Tensor] = []
            with attached(model, [(HookSite.parse(LM_SITE), lambda x, grid: got.append(x.detach().clone()))]):
                model(**enc)
            rows.append(got[0][enc["attention_mask"].bool()])
    lm_sae, lm_report = _train(torch.cat(rows), LM_SITE, LLAVA_NAME, size, seed + 1)

    for name, sae in (("vision", vis_sae), ("lm", lm_sae)):
        save_native(sae, out / "saes" / name)
    return {"kind": "llava", "saes": {"vision": vis_report, "lm": lm_report}}


def ensure_llava_demo(cache_dir: Path | str | None = None, seed: int = 0, size: DemoSize = DemoSize()) -> ModelSpec:
    """The tiny LLaVA mechanics demo, built on first use and cached; returns its ModelSpec."""
    path = _cached(cache_dir, LLAVA_NAME, seed, lambda out: _build_llava(out, seed, size))
    m = read_manifest(path)
    fvu = ", ".join(f"{n} FVU {r['fvu']:.2f}" for n, r in m["saes"].items())
    return ModelSpec(
        name=LLAVA_NAME,
        kind="llava",
        path=str(path / "model"),
        saes=(SaeSpec("vision", str(path / "saes" / "vision")), SaeSpec("lm", str(path / "saes" / "lm"))),
        description=(f"MECHANICS DEMO: a tiny LLaVA with RANDOM weights (seed {seed}); its answers are meaningless. "
                     f"SAEs briefly trained on its own activations ({fvu}); steering, readouts and scopes are real."),
    )


# -- SDXL-Turbo ------------------------------------------------------------------------------------
def _sdxl_prompts(n: int) -> list[tuple[str, str]]:
    """(prompt, colour) pairs cycling through colours and objects."""
    names = list(PALETTE)
    return [(f"a {names[i % len(names)]} {OBJECTS[(i // len(names)) % len(OBJECTS)]}", names[i % len(names)]) for i in range(n)]


def _build_sdxl(out: Path, seed: int, size: DemoSize) -> dict[str, Any]:
    from diffusers import StableDiffusionXLPipeline

    from sae_runtime.demo.tiny_sdxl import save_tiny_sdxl
    from sae_runtime.formats import save_native
    from sae_runtime.sites import HookSite, attached

    pipe_dir = save_tiny_sdxl(out / "pipeline", seed=seed)
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts = _sdxl_prompts(size.sdxl_prompts)
    grabbed: dict[str, list[Tensor]] = {n: [] for n in SDXL_SITES}
    last_step: dict[str, list[Tensor]] = {n: [] for n in SDXL_SITES}  # one grid per image, for labels

    def grab(name: str):
        return lambda x, grid: grabbed[name].append(x.detach().clone())

    hooks = [(HookSite.parse(site), grab(name)) for name, site in SDXL_SITES.items()]
    with torch.no_grad(), attached(pipe.unet, hooks):
        for steps in (1, 2):
            for s in range(0, len(prompts), 16):
                chunk = [p for p, _ in prompts[s : s + 16]]
                gens = [torch.Generator().manual_seed(seed * 100_003 + s + i) for i in range(len(chunk))]
                marks = {n: len(v) for n, v in grabbed.items()}
                pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=0.0, generator=gens, output_type="latent")
                if steps == 1:
                    for n in SDXL_SITES:
                        last_step[n].extend(grabbed[n][marks[n]])
    report: dict[str, Any] = {}
    colour_tags = [{f"color:{c}"} for _, c in prompts]
    for i, (name, site) in enumerate(SDXL_SITES.items()):
        acts = torch.cat(grabbed[name])  # (images * steps, positions, C)
        sae, rep = _train(acts.reshape(-1, acts.shape[-1]), site, SDXL_NAME, size, seed + 10 + i)
        with torch.no_grad():
            means = torch.stack([sae.encode(x).mean(0) for x in last_step[name]])  # (images, d_sae)
        top = means.topk(size.k, dim=-1).indices
        fires = torch.zeros_like(means, dtype=torch.bool).scatter_(1, top, True) & (means > 0)
        rep["labels"] = _label(sae, fires, colour_tags, min_f1=0.5)
        save_native(sae, out / "saes" / name)
        report[name] = rep
    return {"kind": "sdxl_turbo", "saes": report}


def ensure_sdxl_demo(cache_dir: Path | str | None = None, seed: int = 0, size: DemoSize = DemoSize()) -> ModelSpec:
    """The tiny SDXL-Turbo mechanics demo, built on first use and cached; returns its ModelSpec."""
    path = _cached(cache_dir, SDXL_NAME, seed, lambda out: _build_sdxl(out, seed, size))
    m = read_manifest(path)
    fvu = ", ".join(f"{n} FVU {r['fvu']:.2f}" for n, r in m["saes"].items())
    return ModelSpec(
        name=SDXL_NAME,
        kind="sdxl_turbo",
        path=str(path / "pipeline"),
        saes=tuple(SaeSpec(n, str(path / "saes" / n)) for n in SDXL_SITES),
        description=(f"MECHANICS DEMO: a tiny SDXL-Turbo pipeline with RANDOM weights (seed {seed}); its images are noise-like. "
                     f"SAEs briefly trained on its own U-Net block updates ({fvu}); masks, step windows, CFG halves and maps are real."),
    )


def ensure_multimodal_demos(cache_dir: Path | str | None = None, seed: int = 0, size: DemoSize = DemoSize()) -> tuple[ModelSpec, ModelSpec]:
    """Both demos (LLaVA, SDXL-Turbo), built or loaded from the cache."""
    return ensure_llava_demo(cache_dir, seed, size), ensure_sdxl_demo(cache_dir, seed, size)


__all__ = ["DemoSize", "FORMAT_VERSION", "default_cache_dir", "ensure_llava_demo", "ensure_multimodal_demos",
           "ensure_sdxl_demo", "read_manifest", "synthetic_images"]
