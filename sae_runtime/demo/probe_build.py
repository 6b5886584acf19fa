"""Fit the demo's hallucination-risk probe (the build's step 4), or refit the shipped one alone.

    python -m sae_runtime.demo.probe_build --models models [--items 7200] [--seed 0]

Refitting also carries the probe to the stitching demo's ``demo-lm-b`` when it is built.

Items are :func:`layouts.probe_training_items`: half the world's default mix (1-3 facts of
distinct families, every uncertainty level), half the ``mixed`` layout (1-4 facts whose families
may repeat, sometimes a story sentence in between), so the probe sees contexts where another
animal holds a value of the asked family. The LM answers greedily; :func:`world.is_hallucinated`
labels each answer; the probe is fitted on the pooled latents of prompt + answer (L1 chosen on a
validation split; a stratified quarter held out for the AUROCs in its metadata, then the shipped
probe refitted on every item).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from sae_runtime.errors import InvalidArgument


def fit_demo_probe(model: Any, tok: Any, sae: Any, sae_name: str, n_items: int, seed: int, progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """(RiskProbe, metrics) for ``sae`` (named ``sae_name``) on ``n_items`` items drawn with ``seed``."""
    from sae_runtime.demo import world
    from sae_runtime.demo.build import answer_items
    from sae_runtime.demo.layouts import probe_training_items
    from sae_runtime.risk import RiskProbe, auroc, select_l1, stratified_split
    from sae_runtime.training.risk_data import LabelledCompletion, collect_pooled, layout_of

    items = probe_training_items(n_items, seed)
    completions, labels = answer_items(model, tok, items)
    rows = [LabelledCompletion(it.prompt, c, y) for it, c, y in zip(items, completions, labels)]
    pooled = collect_pooled(model, tok, {sae_name: sae}, rows, batch_size=64, progress=progress)
    layout = layout_of({sae_name: sae})
    features = layout.build(pooled, "final")
    y = torch.tensor(labels)
    if y.min() == y.max():
        raise InvalidArgument(f"all {len(items)} probe answers got the same label; train the LM longer or use more items", field="probe_items")
    train_idx, val_idx = stratified_split(y, 0.25, seed)
    l1, grid = select_l1(features[train_idx], y[train_idx], layout, seed=seed)
    split = RiskProbe.fit(features[train_idx], y[train_idx], layout, l1=l1)
    n_prompt = layout.n_features("prompt")
    val_auroc = {
        "prompt": auroc(split.predict_proba(features[val_idx][:, :n_prompt], "prompt"), y[val_idx]),
        "final": auroc(split.predict_proba(features[val_idx], "final"), y[val_idx]),
    }
    # The validation AUROCs are the split fit's; the shipped probe is refitted on every item.
    probe = RiskProbe.fit(features, y, layout, l1=l1, latent_labels={sae_name: dict(sae.labels)})
    probe.meta.update(val_auroc_prompt=val_auroc["prompt"], val_auroc_final=val_auroc["final"], val_auroc_of="the fit on the other 3/4", l1_grid={str(k): v for k, v in grid.items()}, training_items="layouts.probe_training_items")
    probe.meta.update(abstain_text=f"{world.UNKNOWN} .", unknown_latents=unknown_latents(model, tok, sae, 200, seed + 1) | {"sae": sae_name})
    return probe, {"n_items": len(items), "halluc_rate": float(y.float().mean()), "l1": l1, "val_auroc": val_auroc}


def unknown_latents(model: Any, tok: Any, sae: Any, n: int, seed: int, top: int = 3) -> dict[str, Any]:
    """The latents that carry the answer ``unknown``, for the ``steer_unknown`` mitigation: at the
    last prompt position (``answer :``), the ``top`` latents whose mean activation most exceeds,
    on empty-context questions (the LM answers ``unknown``), its mean on intact-context ones;
    their value is that empty-context mean."""
    import random

    from sae_runtime.demo import world
    from sae_runtime.training.activations import capture, tokenize

    rng = random.Random(seed)
    empty = [world.question_text(rng.choice(world.FAMILIES["animal"]), rng.choice(world.FACT_FAMILIES)) for _ in range(n)]
    intact = [it.prompt for it in world.fact_items(n, seed, mix=[("intact", 0.0)])]

    def last_latents(prompts: list[str]) -> torch.Tensor:
        batch = tokenize(tok, prompts, 128)
        acts = capture(model, sae.cfg.hook_name, batch["input_ids"], batch["attention_mask"])
        last = batch["attention_mask"].sum(1) - 1
        with torch.no_grad():
            return sae.encode(acts[torch.arange(len(prompts)), last].float()).float()

    on_empty, on_intact = last_latents(empty).mean(0), last_latents(intact).mean(0)
    order = torch.argsort(on_empty - on_intact, descending=True)[:top]
    return {"sae": None, "latents": [int(i) for i in order], "values": [float(on_empty[i]) for i in order], "where": "last prompt position"}


def carry_to_model_b(probe: Any, models: Path) -> None:
    """Re-carry a refitted probe to the stitching demo's model B (as its build does), if it is built."""
    from sae_runtime.demo.stitch_demo import NAME, RISK_DIR, STITCH_DIR
    from sae_runtime.stitch.maps import Stitch
    from sae_runtime.stitch.transfer import transfer_probe

    root_b = models / NAME
    if (root_b / STITCH_DIR).is_dir():
        transfer_probe(probe, Stitch.load(root_b / STITCH_DIR)).save(root_b / RISK_DIR)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.probe_build", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models")
    p.add_argument("--items", type=int, default=None, help="default: the build manifest's probe_items")
    p.add_argument("--seed", type=int, default=None, help="default: the build manifest's seed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.demo.build import MANIFEST, MODEL_DIR, RISK_DIR, SAE_NAME
    from sae_runtime.formats import load_sae

    torch.set_num_threads(args.threads)
    root = Path(args.models) / "demo-lm"
    manifest = json.loads((root / MANIFEST).read_text())
    seed = manifest["seed"] if args.seed is None else args.seed
    n = manifest["config"]["probe_items"] if args.items is None else args.items
    tok = AutoTokenizer.from_pretrained(str(root / MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(root / MODEL_DIR)).eval()
    started = time.perf_counter()
    probe, metrics = fit_demo_probe(model, tok, load_sae(root / "saes" / SAE_NAME), SAE_NAME, n, seed + 30)
    probe.save(root / RISK_DIR)
    seconds = round(time.perf_counter() - started, 1)
    # build_seconds stays the whole build's: the other steps' times plus this refit's
    manifest["build_seconds"] = round(manifest["build_seconds"] - manifest["timings"].get("risk", 0.0) + seconds, 1)
    manifest["timings"]["risk"] = seconds
    manifest["config"]["probe_items"] = n
    manifest["metrics"]["risk"] = metrics
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    carry_to_model_b(probe, Path(args.models))
    print(json.dumps(metrics, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
