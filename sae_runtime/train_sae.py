"""Train an SAE on a model's activations at one hook site and save it.

    python -m sae_runtime.train_sae --model DIR --hook blocks.1.hook_resid_post --texts file.txt \\
        --arch topk --d-sae 512 --k 16 --steps 2000 --out DIR [--format native|saelens]

``--texts``: one text per line. The last ``--eval-fraction`` of the texts is held out for the
metrics (FVU, L0, dead fraction, loss recovered). ``--concepts FILE`` (JSONL rows
``{"text": ..., "concepts": [...]}``) labels latents before saving. The SAE goes to ``--out`` in the
chosen format, with ``training_report.json`` next to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from sae_runtime.errors import run_cli
from sae_runtime.training.trainer import ARCHITECTURES, TrainConfig

REPORT_FILE = "training_report.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.train_sae", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (from_pretrained)")
    p.add_argument("--hook", required=True, help="hook site, e.g. blocks.1.hook_resid_post")
    p.add_argument("--texts", required=True, help="text file, one text per line")
    p.add_argument("--out", required=True, help="output directory for the SAE")
    p.add_argument("--arch", default="topk", choices=ARCHITECTURES)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1024, help="activation rows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1-coeff", type=float, default=5.0, help="standard")
    p.add_argument("--l0-coeff", type=float, default=1.0, help="jumprelu")
    p.add_argument("--bandwidth", type=float, default=0.05, help="jumprelu pseudo-derivative width")
    p.add_argument("--dead-after-tokens", type=int, default=100_000)
    p.add_argument("--format", default="native", choices=("native", "saelens"))
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--text-batch", type=int, default=8, help="texts per forward pass")
    p.add_argument("--store", default=None, help="write activations as shards here (default: in memory)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--concepts", default=None, help="JSONL {text, concepts} to label latents")
    p.add_argument("--skip-bos", action="store_true", help="drop the first position of every text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def read_texts(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.formats import save_native, save_saelens
    from sae_runtime.training.activations import ActivationStore
    from sae_runtime.training.evaluation import loss_recovered_on_texts
    from sae_runtime.training.labelling import label_sae_on_texts
    from sae_runtime.training.trainer import train_sae

    torch.manual_seed(args.seed)
    progress = not args.no_progress
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    texts = read_texts(args.texts)
    n_eval = max(1, int(len(texts) * args.eval_fraction)) if len(texts) > 1 else 0
    train_texts, eval_texts = texts[: len(texts) - n_eval], texts[len(texts) - n_eval :]
    common = dict(batch_size=args.text_batch, max_length=args.max_length, skip_bos=args.skip_bos, model_name=args.model, progress=progress)
    store = ActivationStore.collect(model, tokenizer, train_texts, args.hook, out_dir=args.store, **common)
    eval_acts = ActivationStore.collect(model, tokenizer, eval_texts, args.hook, **common).tensor() if eval_texts else None
    cfg = TrainConfig(
        architecture=args.arch, d_sae=args.d_sae, k=args.k, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        l1_coeff=args.l1_coeff, l0_coeff=args.l0_coeff, bandwidth=args.bandwidth, dead_after_tokens=args.dead_after_tokens,
        seed=args.seed,
    )
    result = train_sae(store, cfg, hook_name=args.hook, model_name=args.model, eval_acts=eval_acts, progress=progress)
    sae = result.sae.to(args.device)
    lr = loss_recovered_on_texts(model, tokenizer, (eval_texts or train_texts)[:64], args.hook, sae, args.max_length)
    result.report.loss_recovered = lr
    labels = None
    if args.concepts:
        rows = [json.loads(line) for line in Path(args.concepts).read_text(encoding="utf-8").splitlines() if line.strip()]
        table = label_sae_on_texts(model, tokenizer, sae, args.hook, [(r["text"], r["concepts"]) for r in rows], max_length=args.max_length)
        labels = table.rows()
        print(table.format())
    out = (save_native if args.format == "native" else save_saelens)(sae.cpu(), args.out)
    report = result.report.to_dict()
    report["labels"] = labels
    report["tokens_collected"] = store.n_tokens
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    f = result.report.final
    print(
        f"{args.arch} d_sae={args.d_sae}: L0 {f.l0:.2f}  FVU {f.fvu:.4f} (initial {result.report.initial.fvu:.4f})  "
        f"dead {f.dead_fraction:.1%}  loss recovered {lr.fraction:.4f} "
        f"(clean {lr.clean:.4f}, SAE {lr.with_sae:.4f}, zero {lr.zero_ablated:.4f})"
    )
    print(f"saved {args.format} SAE to {out}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())


__all__ = ["main", "cli", "parse_args", "read_texts"]
