"""Build the shapes-world demos from a fixed seed: LLaVA + SAEs + risk probe, SDXL-Turbo + SAEs.

    python -m sae_runtime.demo.shapes_build --out models [--seed 0] [--quick]

Writes ``<out>/demo-llava/`` (``model/``, ``saes/vision``, ``saes/lm``, ``risk/``, ``manifest.json``)
and ``<out>/demo-sdxl-turbo/`` (``pipeline/``, ``saes/<block>``, ``manifest.json``).

- LLaVA: train the model (:mod:`.shapes_llava`); collect vision-layer activations (CLS and the
  4 patches) and language-model activations (all prompt positions) over images of several noise
  levels; train TopK SAEs with the project's trainer; label vision latents from the image's
  concepts on its patches (``color:``, ``shape:``, ``pos:``; :func:`.shapes_llava.patch_concepts`)
  and language latents from the image tokens; answer colour questions about images of noise 0..1
  greedily, label each answer wrong or right, and fit the risk probe on the pooled vision and
  language latents; calibrate each ``color:X`` clamp's strength by its effect (:mod:`.shapes_clamps`).
- SDXL-Turbo: train VAE, text encoders and U-Net (:mod:`.shapes_sdxl`); collect the updates of
  three transformer blocks over one-step generations of every caption; train an SAE per block;
  label latents from the concepts of the caption (every cell: cross-attention writes the
  prompt everywhere), and by what they draw when clamped (``draws:<colour>``, :mod:`.shapes_effects`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sae_runtime.demo import shapes_clamps
from sae_runtime.demo import shapes_llava as sl
from sae_runtime.demo import shapes_sdxl as ss
from sae_runtime.demo import shapes_world as sw

LLAVA, SDXL = shapes_clamps.LLAVA, "demo-sdxl-turbo"
PROBE_NOISE = tuple(np.round(np.linspace(0, 1, 11), 2).tolist())


@dataclass(frozen=True)
class ShapesBuildConfig:
    seed: int = 0
    llava: sl.LlavaTrainConfig = field(default_factory=sl.LlavaTrainConfig)
    sdxl: ss.SdxlTrainConfig = field(default_factory=ss.SdxlTrainConfig)
    d_sae: int = 128  # the U-Net blocks' SAEs
    llava_d_sae: int = 256  # the LLaVA's vision and LM SAEs (more latents split colours less by shape)
    k: int = 8
    sae_steps: int = 400
    sae_batch: int = 512
    vision_images: int = 3000
    #: noise levels of the vision SAE's training images: mostly structured ones, so that latents
    #: go to concepts; pure noise keeps a share so noisy inputs stay in distribution
    vision_noise: tuple[float, ...] = (0.0, 0.0, 0.1, 0.25, 0.5, 1.0)
    lm_images: int = 600
    clamp_scenes: int = 48  # selection images of the vision colour clamps' calibration (:mod:`.shapes_clamps`)
    probe_items: int = 900
    sdxl_seeds: int = 2
    #: ``draws:`` labels: the clamp (x a latent's mean activation where it fires), selection
    #: prompts, and the share of them a latent must recolour.
    effect_mult: float = 60.0
    effect_scenes: int = 24
    effect_min_share: float = 0.3
    threads: int = 1  # LLaVA and the SAEs: on the shared 2-core build machine a second thread bought nothing
    sdxl_threads: int = 2  # the SDXL U-Net's convolutions: 1.6x faster on 2 threads

    def quick(self) -> "ShapesBuildConfig":
        return replace(self, llava=self.llava.quick(), sdxl=self.sdxl.quick(), d_sae=32, llava_d_sae=32, k=4, sae_steps=10,
                       sae_batch=128, vision_images=48, lm_images=24, probe_items=60, clamp_scenes=8, sdxl_seeds=1, effect_scenes=4)


def _train_sae(rows: Tensor, hook: str, model: str, cfg: ShapesBuildConfig, seed: int, d_sae: int):
    from sae_runtime.training.trainer import TrainConfig, train_sae

    tc = TrainConfig(architecture="topk", d_sae=d_sae, k=cfg.k, steps=cfg.sae_steps, batch_size=min(cfg.sae_batch, rows.shape[0]),
                     lr=2e-3, seed=seed, log_every=max(cfg.sae_steps // 4, 1), dead_after_tokens=50_000)
    result = train_sae(rows.float(), tc, hook_name=hook, model_name=model, progress=False)
    m = result.report.final
    return result.sae.eval(), {"hook_name": hook, "d_sae": d_sae, "k": cfg.k, "steps": cfg.sae_steps, "rows": int(rows.shape[0]),
                               "l0": round(m.l0, 3), "fvu": round(m.fvu, 4), "dead_fraction": round(m.dead_fraction, 4)}


def label(sae: Any, latents: Tensor, tags: Sequence[Sequence[str]], min_f1: float = 0.3) -> dict[str, Any]:
    """Label latents (rows (N, d_sae) of activations) with concepts: best F1 per concept, at least
    ``min_f1``; a latent that is the best match of several concepts keeps only its best one. Sets
    ``sae.labels``; returns the table with each latent's mean activation where it fires (``mean_on``)."""
    from sae_runtime.training.labelling import label_table

    table = label_table(latents > 0, tags, min_f1=min_f1)
    best: dict[int, Any] = {}
    for r in table.by_concept:
        if r.latent not in best or r.f1 > best[r.latent].f1:
            best[r.latent] = r
    kept = [r for r in table.by_concept if best[r.latent] is r]
    sae.labels = {r.concept: r.latent for r in kept}
    return {r.concept: {"latent": r.latent, "precision": round(r.precision, 3), "recall": round(r.recall, 3), "f1": round(r.f1, 3),
                         "mean_on": float(latents[:, r.latent][latents[:, r.latent] > 0].mean())}
            for r in kept}


# -- LLaVA ------------------------------------------------------------------------------------
def vision_acts(model: Any, processor: Any, scenes: Sequence[sw.Scene], chunk: int = 128) -> Tensor:
    """(N, 1 + patches, d_vision) at the vision SAE's site (the vision tower alone runs)."""
    from sae_runtime.sites import HookSite, attached

    out: list[Tensor] = []
    site = HookSite.parse(sl.VISION_SITE)
    with torch.no_grad(), attached(model, [(site, lambda x, grid: out.append(x.detach().clone()))]):
        for s in range(0, len(scenes), chunk):
            model.model.vision_tower(pixel_values=sl.pixel_values(processor, [sw.render(x) for x in scenes[s : s + chunk]]))
    return torch.cat(out)


def prompt_forward(model: Any, processor: Any, scenes: Sequence[sw.Scene], kind: str, chunk: int = 128):
    """For ``kind`` questions about ``scenes`` (prompt only, as the backend builds it): the vision
    and LM activations and the next-token logits. Returns (vision (N, 17, d), lm (N, T, d), logits (N, V))."""
    from sae_runtime.sites import HookSite, attached

    ids = torch.tensor([sl.prompt_ids(processor, sw.QUESTIONS[kind])])
    vis, lm, logits = [], [], []
    for s in range(0, len(scenes), chunk):
        part = scenes[s : s + chunk]
        pv = sl.pixel_values(processor, [sw.render(x) for x in part])
        got: dict[str, Tensor] = {}
        hooks = [(HookSite.parse(site), (lambda n: lambda x, g: got.__setitem__(n, x.detach().clone()))(site))
                 for site in (sl.VISION_SITE, sl.LM_SITE)]
        with torch.no_grad(), attached(model, hooks):
            out = model(input_ids=ids.expand(len(part), -1), pixel_values=pv)
        vis.append(got[sl.VISION_SITE]), lm.append(got[sl.LM_SITE]), logits.append(out.logits[:, -1])
    return torch.cat(vis), torch.cat(lm), torch.cat(logits)


def build_llava(root: Path, cfg: ShapesBuildConfig, log: Callable[[str], None], llava_from: str | Path | None = None) -> dict[str, Any]:
    t = time.perf_counter()
    if llava_from is None:
        model, processor, train_metrics = sl.train(replace(cfg.llava, seed=cfg.seed), log)
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(llava_from)).eval()
        processor = AutoProcessor.from_pretrained(str(llava_from))
        train_metrics = {"reused_from": "an earlier run of shapes_llava.train with this config"}
    sl.save(model, processor, root / "model")
    out = llava_saes(model, processor, root, cfg, log)
    out["timings"]["train"] = round(time.perf_counter() - t - sum(out["timings"].values()), 1)
    return {"train": train_metrics, **out}


def llava_saes(model: Any, processor: Any, root: Path, cfg: ShapesBuildConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The LLaVA's SAEs, labels and risk probe, saved under ``root``."""
    from sae_runtime.formats import save_native
    from sae_runtime.risk import PooledStats, ProbeLayout, RiskProbe, auroc, select_l1, stratified_split

    timings: dict[str, float] = {}
    t = time.perf_counter()
    noisy = sw.random_scenes(cfg.vision_images, cfg.seed + 10, noise_levels=cfg.vision_noise)
    vis = vision_acts(model, processor, noisy)
    vis_sae, vis_rep = _train_sae(vis.reshape(-1, vis.shape[-1]), sl.VISION_SITE, LLAVA, cfg, cfg.seed + 11, cfg.llava_d_sae)
    clean = sw.random_scenes(cfg.vision_images // 2, cfg.seed + 12)
    cvis = vision_acts(model, processor, clean)
    with torch.no_grad():
        patch_latents = vis_sae.encode(cvis[:, 1:].reshape(-1, cvis.shape[-1]))  # patches only (CLS has no place)
    tags = [t for s in clean for t in sl.patch_concepts(s)]
    vis_rep["labels"] = label(vis_sae, patch_latents, tags)

    lm_scenes = sw.random_scenes(cfg.lm_images, cfg.seed + 13, noise_levels=sw.NOISE_LEVELS)
    lm_rows, lm_tag_rows, lm_tags = [], [], []
    for j, kind in enumerate(sw.QUESTIONS):
        part = lm_scenes[j::3]
        _, lm, _ = prompt_forward(model, processor, part, kind)
        lm_rows.append(lm.reshape(-1, lm.shape[-1]))
        clean_part = [s for s in part if s.noise == 0]
        if clean_part:
            _, lmc, _ = prompt_forward(model, processor, clean_part, kind)
            lm_tag_rows.append(lmc[:, 1 : 1 + sl.N_PATCHES].reshape(-1, lmc.shape[-1]))  # the image tokens
            lm_tags += [t for s in clean_part for t in sl.patch_concepts(s)]
    lm_sae, lm_rep = _train_sae(torch.cat(lm_rows), sl.LM_SITE, LLAVA, cfg, cfg.seed + 14, cfg.llava_d_sae)
    with torch.no_grad():
        lm_rep["labels"] = label(lm_sae, lm_sae.encode(torch.cat(lm_tag_rows)), lm_tags)
    for name, sae in (("vision", vis_sae), ("lm", lm_sae)):
        save_native(sae, root / "saes" / name)
    timings["saes"] = round(time.perf_counter() - t, 1)

    # risk probe: colour questions over noise 0..1, label = the greedy colour answer is wrong
    t = time.perf_counter()
    items = sw.random_scenes(cfg.probe_items, cfg.seed + 15, noise_levels=PROBE_NOISE)
    vis_p, lm_p, logits = prompt_forward(model, processor, items, "colour")
    tok = processor.tokenizer
    colour_ids = torch.tensor([tok.convert_tokens_to_ids(c) for c in sw.COLOURS])
    # the answer is the most likely colour word (the trained model answers colour questions with one)
    predicted = logits[:, colour_ids].argmax(-1)
    y = torch.tensor([int(int(p) != list(sw.COLOURS).index(s.colour)) for p, s in zip(predicted, items)])
    with torch.no_grad():
        fv, fl = vis_sae.encode(vis_p), lm_sae.encode(lm_p)
    pooled = {"vision": PooledStats(fv.mean(1), fv.amax(1)), "lm": PooledStats(fl.mean(1), fl.amax(1))}
    layout = ProbeLayout((("vision", vis_sae.d_sae), ("lm", lm_sae.d_sae)))
    features = layout.build(pooled, "final")
    tr, va = stratified_split(y, 0.25, cfg.seed)
    l1, grid = select_l1(features[tr], y[tr], layout, seed=cfg.seed)
    probe = RiskProbe.fit(features[tr], y[tr], layout, l1=l1, latent_labels={"vision": dict(vis_sae.labels), "lm": dict(lm_sae.labels)})
    n_prompt = layout.n_features("prompt")
    val_auroc = auroc(probe.predict_proba(features[va][:, :n_prompt], "prompt"), y[va])
    probe.meta.update(val_auroc_prompt=val_auroc, target="the greedy answer to the colour question is wrong")
    probe.save(root / "risk")
    timings["risk"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    backend = shapes_clamps.llava_backend(root, risk=False)
    selection = sw.random_scenes(cfg.clamp_scenes, cfg.seed + 16)
    for lab, c in shapes_clamps.calibrate(backend, vis_rep["labels"], selection).items():
        vis_rep["labels"][lab].update(c)
    vis_rep["says"] = shapes_clamps.says_labels(backend, patch_latents, [s.colour for s in clean for _ in range(sl.N_PATCHES)], selection)
    vis_sae.labels = {**vis_sae.labels, **{lab: d["latent"] for lab, d in vis_rep["says"].items()}}
    save_native(vis_sae, root / "saes" / "vision")
    timings["clamps"] = round(time.perf_counter() - t, 1)
    log(f"  llava: vision SAE FVU {vis_rep['fvu']:.3f} ({len(vis_rep['labels'])} labels), lm SAE FVU {lm_rep['fvu']:.3f}, "
        f"probe val AUROC {val_auroc:.3f} (wrong rate {float(y.float().mean()):.2f}), {len(vis_rep['says'])} says: labels")
    return {"saes": {"vision": vis_rep, "lm": lm_rep},
            "risk": {"n_items": len(items), "wrong_rate": float(y.float().mean()), "l1": l1, "val_auroc_prompt": val_auroc},
            "timings": timings}


# -- SDXL-Turbo --------------------------------------------------------------------------------
def block_updates(pipe: Any, captions: Sequence[str], seeds: Sequence[int], chunk: int = 48) -> dict[str, Tensor]:
    """Per block name, the update (N, h, w, C) of one-step generations of ``captions`` (seed per row)."""
    from sae_runtime.sites import HookSite, attached

    got: dict[str, list[Tensor]] = {n: [] for n in ss.BLOCKS}

    def keep(name: str):
        return lambda x, grid: got[name].append(x.detach().reshape(x.shape[0], *grid, x.shape[-1]).clone())  # (B, h, w, C)

    hooks = [(HookSite.parse(site), keep(name)) for name, site in ss.BLOCKS.items()]
    with torch.no_grad(), attached(pipe.unet, hooks):
        for s in range(0, len(captions), chunk):
            gens = [torch.Generator().manual_seed(int(x)) for x in seeds[s : s + chunk]]
            pipe(prompt=list(captions[s : s + chunk]), num_inference_steps=1, guidance_scale=0.0, generator=gens, output_type="latent")
    return {n: torch.cat(v) for n, v in got.items()}


def build_sdxl(root: Path, cfg: ShapesBuildConfig, log: Callable[[str], None]) -> dict[str, Any]:
    t = time.perf_counter()
    torch.set_num_threads(cfg.sdxl_threads)
    try:
        pipe, train_metrics = ss.train(replace(cfg.sdxl, seed=cfg.seed), log)
        ss.save(pipe, root / "pipeline")
        train_s = round(time.perf_counter() - t, 1)
        out = sdxl_saes(pipe, root, cfg, log)
    finally:
        torch.set_num_threads(cfg.threads)
    out["timings"]["train"] = train_s
    return {"train": train_metrics, **out}


def sdxl_saes(pipe: Any, root: Path, cfg: ShapesBuildConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """An SAE per U-Net block (:data:`shapes_sdxl.BLOCKS`), labelled by the caption's concepts and
    by what its latents draw, saved under ``root`` (which already holds ``pipeline/``)."""
    from sae_runtime.demo.shapes_effects import draw_labels, sdxl_backend
    from sae_runtime.formats import save_native

    timings: dict[str, float] = {}
    t = time.perf_counter()
    scenes = sw.all_scenes() * cfg.sdxl_seeds
    seeds = [cfg.seed * 1_000_003 + 17 + i for i in range(len(scenes))]
    updates = block_updates(pipe, [s.caption for s in scenes], seeds)
    saes: dict[str, Any] = {}
    trained: dict[str, tuple[Any, Tensor]] = {}
    for i, (name, site) in enumerate(ss.BLOCKS.items()):
        u = updates[name]  # (N, h, w, C)
        sae, rep = _train_sae(u.reshape(-1, u.shape[-1]), site, SDXL, cfg, cfg.seed + 20 + i, cfg.d_sae)
        # Cross-attention writes the prompt into every cell of a block's update, so cells carry
        # the image's concepts: tag every cell with its caption's concepts.
        tags = [s.concepts for s in scenes for _ in range(u.shape[1] * u.shape[2])]
        with torch.no_grad():
            lat = sae.encode(u.reshape(-1, u.shape[-1]))
        rep["labels"] = label(sae, lat, tags)
        save_native(sae, root / "saes" / name)
        saes[name] = rep
        fires = (lat > 0).sum(0)
        trained[name] = (sae, torch.where(lat > 0, lat, 0).sum(0) / fires.clamp(min=1))
    timings["saes"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    backend = sdxl_backend(root)
    rng = np.random.default_rng(cfg.seed + 40)
    picked = [sw.all_scenes()[int(i)] for i in rng.choice(len(sw.all_scenes()), size=cfg.effect_scenes, replace=False)]
    pick_seeds = [cfg.seed * 1_000_003 + 50_000 + i for i in range(len(picked))]
    for name, (sae, mean_on) in trained.items():
        draws = draw_labels(backend, name, mean_on, picked, pick_seeds, cfg.effect_mult, cfg.effect_min_share)
        sae.labels = {**sae.labels, **{lab: d["latent"] for lab, d in draws.items()}}
        save_native(sae, root / "saes" / name)
        saes[name]["draws"] = draws
    timings["draw_labels"] = round(time.perf_counter() - t, 1)
    log("  sdxl: " + ", ".join(f"{n} FVU {r['fvu']:.3f} ({len(r['labels'])} labels, {len(r['draws'])} draws)" for n, r in saes.items()))
    return {"saes": saes, "timings": timings}


def build(out: str | Path, cfg: ShapesBuildConfig = ShapesBuildConfig(), log: Callable[[str], None] = print,
          llava_from: str | Path | None = None) -> dict[str, Any]:
    """Build both demos under ``out``; returns {name: manifest}. Each manifest records wall and CPU seconds.

    ``llava_from`` reuses the trained LLaVA of an earlier run (a saved model directory) instead of training one.
    """
    torch.set_num_threads(cfg.threads)
    manifests = {}
    steps = ((LLAVA, lambda root, c, lg: build_llava(root, c, lg, llava_from)), (SDXL, build_sdxl))
    for name, fn in steps:
        root = Path(out) / name
        root.mkdir(parents=True, exist_ok=True)
        wall, cpu = time.perf_counter(), time.process_time()
        log(f"[{name}]")
        manifest = {"name": name, "seed": cfg.seed, "config": asdict(cfg), **fn(root, cfg, log)}
        manifest["build_seconds"] = round(time.perf_counter() - wall, 1)
        manifest["build_cpu_seconds"] = round(time.process_time() - cpu, 1)
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float) + "\n")
        log(f"[{name}] {manifest['build_seconds']} s wall, {manifest['build_cpu_seconds']} s CPU")
        manifests[name] = manifest
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.shapes_build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--llava-from", default=None, help="reuse this trained LLaVA directory (development)")
    args = p.parse_args(argv)
    cfg = ShapesBuildConfig(seed=args.seed)
    build(args.out, cfg.quick() if args.quick else cfg, llava_from=args.llava_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
