"""Fit the hallucination-risk probe from labelled completions and report held-out AUROC.

    python -m sae_runtime.train_risk --model DIR --sae DIR [--sae NAME=DIR ...] \\
        --data labelled.jsonl --out DIR [--test-fraction 0.25] [--l1 0.02 | --l1 auto]

``--data``: JSONL rows ``{"prompt": str, "completion": str, "label": 0|1}`` (1 = hallucinated).
The model reads prompt + completion; every SAE's latents are pooled over the prompt and over the
completion positions (mean and max); a stratified, seeded split holds out ``--test-fraction`` of
the rows. The probe (both heads) is fitted on the rest and saved to ``--out``
(risk_probe.json + risk_probe.safetensors, the held-out AUROCs in its metadata).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from sae_runtime.errors import InvalidArgument, run_cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.train_risk", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (from_pretrained)")
    p.add_argument("--sae", action="append", required=True, help="SAE directory, or NAME=DIR (repeatable)")
    p.add_argument("--hook", action="append", default=[], help="NAME=HOOK: override an SAE's hook site")
    p.add_argument("--data", required=True, help="JSONL {prompt, completion, label}")
    p.add_argument("--out", required=True, help="output directory for the probe")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--l1", default="auto", help="L1 strength, or 'auto' (validation AUROC on the training part)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top", type=int, default=10, help="risk latents to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _named(values: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep:
            if what != "sae":
                raise InvalidArgument(f"expected NAME=VALUE, got {v!r}", field=what)
            name, rest = Path(v.rstrip("/")).name, v
        if not name or name in out:
            raise InvalidArgument(f"missing or repeated name in {v!r}", field=what)
        out[name] = rest
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.formats import load_sae
    from sae_runtime.risk import RiskProbe, auroc, select_l1, stratified_split
    from sae_runtime.training.risk_data import collect_pooled, layout_of, read_jsonl

    rows = read_jsonl(args.data)
    saes = {name: load_sae(path, device=args.device) for name, path in _named(args.sae, "sae").items()}
    hooks = _named(args.hook, "hook")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    pooled = collect_pooled(
        model, tokenizer, saes, rows, hook_names=hooks, batch_size=args.batch_size, max_length=args.max_length,
        progress=not args.no_progress,
    )
    layout = layout_of(saes)
    features = layout.build(pooled, "final")
    labels = torch.tensor([r.label for r in rows])
    if labels.sum() < 2 or (1 - labels).sum() < 2:
        raise InvalidArgument("need at least two rows of each label", field="data")
    train, test = stratified_split(labels, args.test_fraction, args.seed)
    if args.l1 == "auto":
        l1, grid = select_l1(features[train], labels[train], layout, seed=args.seed)
        print("l1 validation AUROC: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in grid.items()) + f" -> {l1:g}")
    else:
        l1 = float(args.l1)
    latent_labels = {name: dict(sae.labels) for name, sae in saes.items() if sae.labels}
    probe = RiskProbe.fit(features[train], labels[train], layout, l1=l1, latent_labels=latent_labels)
    n_prompt = layout.n_features("prompt")
    results = {}
    for split, idx in (("train", train), ("test", test)):
        for head in ("prompt", "final"):
            x = features[idx][:, :n_prompt] if head == "prompt" else features[idx]
            y = labels[idx]
            results[f"{split}_auroc_{head}"] = auroc(probe.predict_proba(x, head), y) if 0 < int(y.sum()) < y.numel() else float("nan")
    probe.meta.update(results, n_test=int(test.numel()), data=str(args.data), model=str(args.model))
    probe.save(args.out)
    nz = {head: int(((probe.prompt_coef if head == "prompt" else probe.final_coef) != 0).sum()) for head in ("prompt", "final")}
    print(f"rows: {len(rows)} (train {train.numel()}, test {test.numel()}), l1 {l1:g}, nonzero coefficients {nz}")
    print(
        f"held-out AUROC: prompt head {results['test_auroc_prompt']:.4f}, final head {results['test_auroc_final']:.4f} "
        f"(train {results['train_auroc_prompt']:.4f} / {results['train_auroc_final']:.4f})"
    )
    weights = probe.latent_weights()
    for sae, latent in probe.top_risk_latents(args.top):
        j = layout.latent_offset(sae) + latent
        label = next((k for k, v in latent_labels.get(sae, {}).items() if v == latent), "")
        print(f"  risk latent {sae}:{latent} {label} weight {float(weights[j]):+.4f}")
    print(f"saved risk probe to {args.out}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
