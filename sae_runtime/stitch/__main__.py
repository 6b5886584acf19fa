"""Fit a stitch between two models, or transfer an SAE (and its risk probe) through one.

    python -m sae_runtime.stitch fit --model-a DIR --model-b DIR --hook-a blocks.2.hook_resid_post \\
        [--hook-b blocks.3.hook_resid_post | --hook-b auto] --texts corpus.txt --out STITCH_DIR
    python -m sae_runtime.stitch transfer --sae SAE_DIR --stitch STITCH_DIR --out NEW_SAE_DIR \\
        [--probe PROBE_DIR --probe-out NEW_PROBE_DIR]

``fit`` reads one text per line; ``--hook-b auto`` (the default) picks B's layer by SVCCA.
``transfer`` writes the transferred SAE in the native format (it loads on model B like any other).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from sae_runtime.errors import InvalidArgument, run_cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.stitch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit the affine maps between two models' residual streams")
    f.add_argument("--model-a", required=True)
    f.add_argument("--model-b", required=True)
    f.add_argument("--hook-a", required=True)
    f.add_argument("--hook-b", default="auto", help="B's hook site, or 'auto' (SVCCA)")
    f.add_argument("--texts", required=True, help="text file, one text per line")
    f.add_argument("--out", required=True)
    f.add_argument("--steps", type=int, default=400)
    f.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("transfer", help="transfer an SAE of model A to model B")
    t.add_argument("--sae", required=True)
    t.add_argument("--stitch", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--probe", default=None)
    t.add_argument("--probe-out", default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "fit":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sae_runtime.stitch.maps import StitchConfig
        from sae_runtime.stitch.pipeline import check_same_tokenizer, fit_between

        path = Path(args.texts)
        if not path.is_file():
            raise InvalidArgument("no such file", field="texts")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        tok = AutoTokenizer.from_pretrained(args.model_a)
        check_same_tokenizer(tok, AutoTokenizer.from_pretrained(args.model_b))
        model_a = AutoModelForCausalLM.from_pretrained(args.model_a).eval()
        model_b = AutoModelForCausalLM.from_pretrained(args.model_b).eval()
        hook_b = None if args.hook_b == "auto" else args.hook_b
        stitch = fit_between(model_a, model_b, tok, texts, args.hook_a, hook_b, StitchConfig(steps=args.steps, seed=args.seed), names=(args.model_a, args.model_b))
        stitch.save(args.out)
        print(json.dumps({k: v for k, v in stitch.meta.items() if k != "config"} | {"hook_b": stitch.hook_b}, indent=2, default=float))
        return 0
    from sae_runtime.formats import load_sae, save_native
    from sae_runtime.stitch.maps import Stitch
    from sae_runtime.stitch.transfer import transfer_probe, transfer_sae

    if (args.probe is None) != (args.probe_out is None):
        raise InvalidArgument("give both --probe and --probe-out, or neither", field="probe_out")
    stitch = Stitch.load(args.stitch)
    save_native(transfer_sae(load_sae(args.sae), stitch), args.out)
    print(f"wrote transferred SAE to {args.out}")
    if args.probe:
        from sae_runtime.risk import RiskProbe

        transfer_probe(RiskProbe.load(args.probe), stitch).save(args.probe_out)
        print(f"wrote transferred risk probe to {args.probe_out}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
