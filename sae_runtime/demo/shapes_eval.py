"""Evaluate the shipped shapes demos through the LLaVA and SDXL-Turbo backends; merge keys into a JSON report.

    python -m sae_runtime.demo.shapes_eval --models models --out reports/demo_eval.json

Everything goes through ``LlavaBackend.from_spec`` / ``SdxlTurboBackend.from_spec`` with PNG
bytes in and out, as the service runs them. Scenes and seeds are disjoint from the build's
(``EVAL_SEED``); LLaVA images are new jitter / noise draws, SDXL prompts are the world's captions
with unseen generator seeds.

LLaVA: ``vlm_colour_accuracy`` / ``vlm_shape_accuracy`` / ``vlm_position_accuracy`` (greedy, clean
images); ``vlm_steer_share``: clamp (``set``) the vision SAE's ``color:X`` latent on every vision
position to its value calibrated by the build (:mod:`.shapes_clamps`: a multiple of its mean
activation where it fires, chosen on the build's selection images), over images whose colour is not
X, share of colour answers equal to X, averaged over colours, without the error term
(``preserve_error=False``: the reconstruction replaces the layer) and with it;
``vlm_steer_specificity``: under the same clamp the shape answer stays right; ``vlm_risk_auroc``:
the probe's prompt-time score against "the colour answer is wrong", over noise 0..1, with per
noise level accuracy, mean answer confidence (probability of the greedy first token) and active
vision-SAE latents / labelled concepts; ``dictionaries.vision``: the vision SAE measured as the
LM's dictionaries are (:mod:`.shapes_dictionary`).

SDXL-Turbo: ``image_colour_accuracy`` (dominant non-background colour of one-step generations
matches the prompt); ``image_steer_share`` per block (clamp the block's ``draws:X`` latent, labelled
by what it draws on the build's selection prompts (:mod:`.shapes_effects`), everywhere to the
build's ``effect_mult`` x its mean activation, prompts of another colour and unseen seeds; the best
block is the headline; a generation counts when the shape comes out X with its area kept within
2x of the unsteered twin's, :func:`shapes_world.recoloured`; ``colour_label_share`` is the same with the ``color:X`` latent, labelled by
what it fires on, at ``IMAGE_STEER_MULT``); ``image_mask_locality`` (the same edit masked to
the half of the image that holds the shape: mean absolute pixel change inside over outside;
``image_mask_locality_empty_half`` masks the other half); block specialisation
(which concept families each block's labelled latents hold).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sae_runtime.backends.llava import LlavaBackend
from sae_runtime.backends.sdxl_turbo import SdxlTurboBackend
from sae_runtime.backends.types import ImageRequest
from sae_runtime.demo import shapes_clamps, shapes_effects, shapes_world as sw
from sae_runtime.demo.shapes_clamps import BATCH, answers, clamp
from sae_runtime.demo.shapes_effects import decode
from sae_runtime.demo.shapes_build import LLAVA, PROBE_NOISE, SDXL
from sae_runtime.demo.shapes_sdxl import BLOCKS
from sae_runtime.plan import ReadoutSpec
from sae_runtime.training.logistic import auroc

EVAL_SEED = 7000  # the build uses seed + 0..30
IMAGE_STEER_MULT = 15.0
TARGETS = {
    "vlm_colour_accuracy": (">=", 0.95), "vlm_shape_accuracy": (">=", 0.90), "vlm_steer_share": (">=", 0.80),
    "vlm_steer_specificity": (">=", 0.80), "vlm_risk_auroc": (">=", 0.85), "image_colour_accuracy": (">=", 0.95),
    "image_steer_share": (">=", 0.80), "image_mask_locality": (">=", 5.0), "shapes_build_seconds": ("<", 360.0),
}


def llava_backend(models: str | Path) -> LlavaBackend:
    return shapes_clamps.llava_backend(Path(models) / LLAVA)


def sdxl_backend(models: str | Path) -> SdxlTurboBackend:
    return shapes_effects.sdxl_backend(Path(models) / SDXL)


def correct(text: str, scene: sw.Scene, kind: str) -> bool:
    truth = scene.answer(kind).split()
    return text.split()[: len(truth)] == truth


def steer_report(backend: LlavaBackend, table: dict[str, Any], family: str, pool: Sequence[sw.Scene], per_colour: int) -> dict[str, Any]:
    """Clamp each ``<family>:X`` latent of ``table`` to its build-calibrated ``steer_value`` on every
    vision position, over ``per_colour`` images of ``pool`` of other colours: the share of colour
    answers X and of shape answers kept right (``specificity``; position answers kept right are
    reported beside it), without the error term and with it."""
    out: dict[str, Any] = {"steer_mult": {c: table[f"{family}:{c}"]["steer_mult"] for c in sw.COLOURS if f"{family}:{c}" in table}}
    for preserve in (False, True):
        shares, specific, said, words, placed = {}, {}, {}, {}, {}
        for colour in sw.COLOURS:
            lab = f"{family}:{colour}"
            if lab not in table:
                shares[colour], specific[colour] = 0.0, 0.0
                continue
            scenes = [s for s in pool if s.colour != colour][:per_colour]
            plan = clamp("vision", lab, table[lab]["steer_value"], preserve)
            res = answers(backend, scenes, "colour", plan)
            shares[colour] = float(np.mean([r.steered.text.split()[:1] == [colour] for r in res]))
            words[colour] = float(np.mean([r.steered.text.split()[:1] in [[c] for c in sw.COLOURS] for r in res]))
            res = answers(backend, scenes, "shape", plan)
            specific[colour] = float(np.mean([correct(r.steered.text, s, "shape") for r, s in zip(res, scenes)]))
            said[colour] = {w: sum(r.steered.text.split()[:1] == [w] for r in res) for w in sw.SHAPES}
            res = answers(backend, scenes, "position", plan)
            placed[colour] = float(np.mean([correct(r.steered.text, s, "position") for r, s in zip(res, scenes)]))
        out["with_error" if preserve else "without_error"] = {
            "share": float(np.mean(list(shares.values()))), "specificity": float(np.mean(list(specific.values()))),
            "position_kept": float(np.mean(list(placed.values()))) if placed else 0.0, "per_colour_position_kept": placed,
            "per_colour_share": shares, "per_colour_specificity": specific, "shape_answers": said,
            "colour_word_share": float(np.mean(list(words.values()))) if words else 0.0}
    return out


def eval_llava(models: str | Path, n: int, log=print) -> dict[str, Any]:
    backend = llava_backend(models)
    manifest = json.loads((Path(models) / LLAVA / "manifest.json").read_text())
    labels = manifest["saes"]["vision"]["labels"]
    out: dict[str, Any] = {}
    clean = sw.random_scenes(n, EVAL_SEED)
    for kind in sw.QUESTIONS:
        res = answers(backend, clean, kind)
        out[f"vlm_{kind}_accuracy"] = float(np.mean([correct(r.steered.text, s, kind) for r, s in zip(res, clean)]))
    log(f"  vlm accuracy: " + ", ".join(f"{k} {out[f'vlm_{k}_accuracy']:.3f}" for k in sw.QUESTIONS))

    per_colour = max(4, n // 6)
    pool = sw.random_scenes(per_colour * 6, EVAL_SEED + 1)
    vis = manifest["saes"]["vision"]
    steer = {"says": steer_report(backend, vis["says"], "says", pool, per_colour),
             "color_label": steer_report(backend, labels, "color", pool, per_colour)}
    out["vlm_steer_share"] = steer["says"]["without_error"]["share"]
    out["vlm_steer_specificity"] = steer["says"]["without_error"]["specificity"]
    out["vlm_steer"] = steer | {"images_per_colour": per_colour}
    from sae_runtime.demo.shapes_dictionary import measure_vision

    vision = measure_vision(backend.model, backend.processor, backend.saes["vision"], n, EVAL_SEED + 3)
    headline = steer["says"]["without_error"]
    vision |= {"steer_share": out["vlm_steer_share"], "steer_specificity": out["vlm_steer_specificity"],
               "steer_well_formed": headline["colour_word_share"], "steer_mult": steer["says"]["steer_mult"],
               "shape_answers_under_clamp": headline["shape_answers"]}
    out["dictionaries"] = {"vision": vision}
    log(f"  vision SAE as a dictionary: " + " ".join(f"{k} {vision[k]:.3f}" for k in ("fvu", "loss_recovered", "ms_mean", "fms_at_1",
                                                                                     "fms_at_5", "absorption_fraction")))
    for fam, r in steer.items():
        log(f"  vlm steer ({fam}) share {r['without_error']['share']:.3f} (with error term {r['with_error']['share']:.3f}), "
            f"specificity {r['without_error']['specificity']:.3f} ({r['with_error']['specificity']:.3f})")

    per_level = max(8, n // 4)
    by_noise, scores, wrong = {}, [], []
    for level in PROBE_NOISE:
        scenes = sw.random_scenes(per_level, EVAL_SEED + 2 + int(level * 100), noise_levels=(level,))
        res = answers(backend, scenes, "colour", logprobs=1, readout=ReadoutSpec(saes=("vision",), top_k=256))
        ok = [correct(r.steered.text, s, "colour") for r, s in zip(res, scenes)]
        conf = [float(np.exp(r.steered.tokens[0].logprob)) if r.steered.tokens and r.steered.tokens[0].logprob is not None else 0.0 for r in res]
        active, concepts = [], []
        for r in res:
            pooled = next(p for p in r.pooled if p.sae == "vision")
            on = [a for a in pooled.top_max if a.value > 0]
            active.append(len(on))
            concepts.append(len({a.label for a in on if a.label}))
        scores += [r.risk_prompt.probability for r in res]
        wrong += [int(not o) for o in ok]
        by_noise[str(level)] = {"n": len(scenes), "accuracy": float(np.mean(ok)), "mean_confidence": float(np.mean(conf)),
                                "active_latents": float(np.mean(active)), "active_concepts": float(np.mean(concepts)),
                                "mean_risk": float(np.mean(scores[-len(res):]))}
    out["vlm_risk_auroc"] = auroc(torch.tensor(scores), torch.tensor(wrong))
    out["vlm_by_noise"] = by_noise
    levels = [by_noise[str(l)]["active_latents"] for l in PROBE_NOISE]
    out["vlm_concepts_grow_with_noise"] = bool(np.corrcoef(PROBE_NOISE, levels)[0, 1] > 0.5)  # active latents
    labelled = [by_noise[str(l)]["active_concepts"] for l in PROBE_NOISE]
    out["vlm_labelled_concepts_grow_with_noise"] = bool(np.corrcoef(PROBE_NOISE, labelled)[0, 1] > 0.5)
    log(f"  vlm risk AUROC {out['vlm_risk_auroc']:.3f}; accuracy by noise " +
        " ".join(f"{l}:{by_noise[str(l)]['accuracy']:.2f}" for l in PROBE_NOISE))
    return out


def eval_sdxl(models: str | Path, n_per_colour: int, log=print) -> dict[str, Any]:
    backend = sdxl_backend(models)
    manifest = json.loads((Path(models) / SDXL / "manifest.json").read_text())
    out: dict[str, Any] = {}
    scenes = sw.all_scenes()

    def generate(reqs: list[ImageRequest]) -> list[Any]:
        res = []
        for i in range(0, len(reqs), BATCH // 2):
            res += backend.generate_images(reqs[i : i + BATCH // 2])
        return res

    res = generate([ImageRequest(prompt=s.caption, seed=EVAL_SEED + i) for i, s in enumerate(scenes)])
    out["image_colour_accuracy"] = float(np.mean([sw.dominant_colour(decode(r.png)) == s.colour for r, s in zip(res, scenes)]))
    log(f"  image colour accuracy {out['image_colour_accuracy']:.3f}")

    rng = np.random.default_rng(EVAL_SEED)

    def share(block: str, label: str, value: float, colour: str) -> float:
        others = [s for s in scenes if s.colour != colour]
        picked = [others[int(i)] for i in rng.choice(len(others), size=n_per_colour, replace=False)]
        res = generate([ImageRequest(prompt=s.caption, seed=EVAL_SEED + 500 + i, plan=clamp(block, label, value), include_default=True)
                        for i, s in enumerate(picked)])
        return float(np.mean([sw.recoloured(decode(r.png), decode(r.default_png), colour) for r in res]))

    per_block: dict[str, Any] = {}
    for block in BLOCKS:
        labels, draws = manifest["saes"][block]["labels"], manifest["saes"][block].get("draws", {})
        by_draws = {c: share(block, f"draws:{c}", draws[f"draws:{c}"]["value"], c) if f"draws:{c}" in draws else 0.0 for c in sw.COLOURS}
        by_colour = {c: share(block, f"color:{c}", IMAGE_STEER_MULT * labels[f"color:{c}"]["mean_on"], c) if f"color:{c}" in labels else 0.0
                     for c in sw.COLOURS}
        families = sorted({c.split(":")[0] for c in labels})
        per_block[block] = {"share": float(np.mean(list(by_draws.values()))), "per_colour": by_draws,
                            "draws": {lab: d["latent"] for lab, d in draws.items()},
                            "colour_label_share": float(np.mean(list(by_colour.values()))), "colour_label_per_colour": by_colour,
                            "label_families": families, "labels": sorted(labels)}
    best = max(per_block, key=lambda b: per_block[b]["share"])
    out["image_steer_share"] = per_block[best]["share"]
    out["image_steer_best_block"] = BLOCKS[best]
    out["image_steer_by_block"] = {BLOCKS[b]: v for b, v in per_block.items()}
    log("  image steer share by block (draws: / color: labels): "
        + ", ".join(f"{b} {v['share']:.3f} / {v['colour_label_share']:.3f}" for b, v in per_block.items()))

    # mask locality: the best block's edit confined to one half of the image; the headline masks
    # the half that holds the shape (recolour it, leave the other half alone), the second the
    # empty half (what the edit writes where there is nothing to recolour, against its leak)
    labels = manifest["saes"][best]["labels"]
    picked = scenes[:: max(1, len(scenes) // 24)]
    for key, on_shape in (("image_mask_locality", True), ("image_mask_locality_empty_half", False)):
        ratios = mask_ratios(backend, best, labels, picked, on_shape)
        out[key] = float(np.median(ratios))
        out[f"{key}_mean"] = float(np.mean(ratios))
    log(f"  image mask locality (median inside/outside): shape half {out['image_mask_locality']:.2f}, "
        f"empty half {out['image_mask_locality_empty_half']:.2f}")
    return out


def mask_ratios(backend: SdxlTurboBackend, block: str, labels: dict[str, Any], scenes: Sequence[sw.Scene], on_shape: bool) -> list[float]:
    """Per scene: mean absolute pixel change inside the mask over outside, the ``block`` clamp of
    another colour (each in turn) masked to the half of the image holding the shape (``on_shape``)
    or the other."""
    ratios = []
    for i, s in enumerate(scenes):
        others = [c for c in sw.COLOURS if c != s.colour and f"color:{c}" in labels]
        target = others[i % len(others)]  # every target colour in turn
        shape_left = s.position.endswith("left")
        mask = torch.zeros(sw.SIDE, sw.SIDE)
        mask[:, : sw.SIDE // 2] = 1.0 if shape_left == on_shape else 0.0
        mask[:, sw.SIDE // 2 :] = 1.0 - mask[:, : sw.SIDE // 2]
        plan = clamp(block, f"color:{target}", IMAGE_STEER_MULT * labels[f"color:{target}"]["mean_on"], mask=mask)
        r = backend.generate_images([ImageRequest(prompt=s.caption, seed=EVAL_SEED + 900 + i, plan=plan, include_default=True)])[0]
        diff = np.abs(decode(r.png).astype(float) - decode(r.default_png).astype(float)).mean(-1)
        m = mask.numpy() > 0.5
        ratios.append(diff[m].mean() / max(diff[~m].mean(), 1e-3))
    return ratios


def evaluate(models: str | Path, n: int = 120, n_per_colour: int = 20, parts: Sequence[str] = ("llava", "sdxl"), log=print) -> dict[str, Any]:
    """The report's keys for ``parts``; the build and target keys once both parts are in ``previous``."""
    torch.set_num_threads(2)
    t = time.perf_counter()
    out: dict[str, Any] = {}
    if "llava" in parts:
        out |= eval_llava(models, n, log)
    if "sdxl" in parts:
        out |= eval_sdxl(models, n_per_colour, log)
    out["shapes_eval_seconds"] = round(time.perf_counter() - t, 1)
    return out


def summarise(report: dict[str, Any], models: str | Path) -> dict[str, Any]:
    """Build seconds, artifact sizes, targets and pass/fail, from a report holding both parts."""
    build = [json.loads((Path(models) / m / "manifest.json").read_text()) for m in (LLAVA, SDXL)]
    out = {
        "shapes_build_seconds": round(sum(m["build_seconds"] for m in build), 1),
        "shapes_build_cpu_seconds": round(sum(m["build_cpu_seconds"] for m in build), 1),
        "demo_artifact_bytes": sum(p.stat().st_size for p in Path(models).rglob("*") if p.is_file()),
        "shapes_targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
    }
    merged = report | out
    out["shapes_passed"] = {k: (merged[k] >= v if op == ">=" else merged[k] < v) for k, (op, v) in TARGETS.items() if k in merged}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.shapes_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models")
    p.add_argument("--out", default="reports/demo_eval.json")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--only", choices=("llava", "sdxl"), help="evaluate one demo (its keys are merged into --out)")
    args = p.parse_args(argv)
    report = evaluate(args.models, args.n, parts=(args.only,) if args.only else ("llava", "sdxl"))
    path = Path(args.out)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.setdefault("dictionaries", {}).update(report.pop("dictionaries", {}))
    merged.update(report)
    if all(k in merged for k in ("vlm_colour_accuracy", "image_colour_accuracy")):
        merged.update(summarise(merged, args.models))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps({k: merged[k] for k in TARGETS if k in merged}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
