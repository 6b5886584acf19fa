"""Evaluate dictionaries of a causal LM: a JSON report and a PNG of the per-latent distributions.

    python -m sae_runtime.evaluate --model models/demo-lm/model \
        --sae concepts=models/demo-lm/saes/concepts --ffkv kv=2:12 \
        --concept-world 300 --out reports/dictionaries.json --png reports/dictionaries.png

``--sae NAME=PATH`` (any supported format) and ``--ffkv NAME=LAYER[:K]`` name the dictionaries.
The labelled dataset is either the concept world's tagged stories (``--concept-world N``: every
metric) or plain texts, one per line (``--texts FILE``: reconstruction metrics only, since MS,
FMS and absorption need the inputs' ground truth).

:func:`evaluate_on_texts` is the backend-independent side of the ``EvaluateSae`` RPC: texts in,
reconstruction metrics out, bounded by a :class:`~sae_runtime.backends.spec.Limits`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from sae_runtime.backends.spec import Limits
from sae_runtime.errors import InvalidArgument, TooLarge
from sae_runtime.metrics.reconstruction import ReconstructionMetrics, dictionary_outputs, firing_shares, reconstruction_metrics
from sae_runtime.saes.base import Sae


def evaluate_on_texts(model: nn.Module, tokenizer: Any, sae: Sae, texts: Sequence[str], limits: Limits = Limits(), *, with_loss: bool = True) -> ReconstructionMetrics:
    """Reconstruction metrics of ``sae`` on the tokens of ``texts`` at its hook site.

    TooLarge when there are more texts than ``limits.max_batch_size`` or a text has more tokens
    than ``limits.max_prompt_tokens`` (field ``texts[i]``); InvalidArgument for no or empty texts.
    ``with_loss`` adds loss recovered (three more forwards).
    """
    from sae_runtime.training.activations import ActivationStore

    if not texts:
        raise InvalidArgument("give at least one text", field="texts")
    if len(texts) > limits.max_batch_size:
        raise TooLarge(f"{len(texts)} texts exceed the limit of {limits.max_batch_size}", field="texts")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise InvalidArgument("must be a non-empty string", field=f"texts[{i}]")
        n = len(tokenizer(t)["input_ids"])
        if n > limits.max_prompt_tokens:
            raise TooLarge(f"{n} tokens exceed the limit of {limits.max_prompt_tokens}", field=f"texts[{i}]")
    hook = sae.cfg.hook_name
    if not hook:
        raise InvalidArgument("the SAE names no hook site", field="sae")
    x = ActivationStore.collect(model, tokenizer, list(texts), hook, batch_size=len(texts), max_length=limits.max_prompt_tokens, progress=False).tensor()
    return reconstruction_metrics(sae, x, model=model, tokenizer=tokenizer, texts=list(texts) if with_loss else (), hook_name=hook)


def evaluate_backend_sae(backend: Any, sae: str, texts: Sequence[str], with_loss: bool = True) -> ReconstructionMetrics:
    """:func:`evaluate_on_texts` for the SAE ``sae`` of a text backend (its model, tokenizer,
    limits); NotFound naming ``sae`` for an unknown one, InvalidArgument for a non-text site."""
    from sae_runtime.errors import NotFound
    from sae_runtime.sites import HookSite

    saes = getattr(backend, "saes", {})
    if sae not in saes:
        raise NotFound(f"unknown SAE {sae!r} (known: {', '.join(saes)})", field="sae")
    tokenizer = getattr(backend, "tokenizer", None)
    hook = saes[sae].cfg.hook_name
    if tokenizer is None or not hook or not HookSite.parse(hook).is_text:
        raise InvalidArgument(f"SAE {sae!r} does not read a language model's tokens: EvaluateSae takes texts", field="sae")
    return evaluate_on_texts(backend.model, tokenizer, saes[sae], texts, backend.limits, with_loss=with_loss)


# -- the PNG ----------------------------------------------------------------------------------
def _histogram(values: Sequence[float], bins: int, lo: float, hi: float) -> list[int]:
    counts = [0] * bins
    for v in values:
        if not math.isnan(v):
            counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    return counts


def write_png(path: str | Path, panels: Mapping[str, Mapping[str, Sequence[float]]], ranges: Mapping[str, tuple[float, float]]) -> None:
    """A grid of histograms with PIL: one row per dictionary, one column per per-latent quantity
    (e.g. MS, log10 firing share), each over its fixed range so rows compare."""
    from PIL import Image, ImageDraw

    names = list(panels)
    cols = list(ranges)
    w, h, pad, bins = 260, 120, 24, 30
    img = Image.new("RGB", (pad + len(cols) * (w + pad), pad + len(names) * (h + 2 * pad)), "white")
    draw = ImageDraw.Draw(img)
    for r, name in enumerate(names):
        for c, col in enumerate(cols):
            x0, y0 = pad + c * (w + pad), pad + r * (h + 2 * pad) + pad
            lo, hi = ranges[col]
            counts = _histogram(panels[name].get(col, ()), bins, lo, hi)
            top = max(counts) or 1
            bw = w / bins
            for b, n in enumerate(counts):
                bh = n / top * h
                draw.rectangle([x0 + b * bw, y0 + h - bh, x0 + (b + 1) * bw - 1, y0 + h], fill=(70, 110, 180))
            draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
            draw.text((x0, y0 - 14), f"{name}: {col}", fill="black")
            draw.text((x0, y0 + h + 2), f"{lo:g}", fill="black")
            draw.text((x0 + w - 24, y0 + h + 2), f"{hi:g}", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(str(path))


def latent_distributions(sae: Sae, x: Tensor, emb: Tensor | None) -> dict[str, list[float]]:
    """Per-latent MS (when input embeddings are given) and log10 firing share."""
    from sae_runtime.metrics.ms import monosemanticity

    f, _ = dictionary_outputs(sae, x)
    shares = firing_shares(f)
    out = {"log10 firing share": [math.log10(s) if s > 0 else -6.0 for s in shares.tolist()]}
    if emb is not None:
        out["MS"] = monosemanticity(f, emb).tolist()
    return out


# -- the CLI ----------------------------------------------------------------------------------
def _load(model_dir: str, saes: Sequence[str], ffkvs: Sequence[str]) -> tuple[nn.Module, Any, dict[str, Sae]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.backends.loading import load_spec_saes
    from sae_runtime.backends.spec import ModelSpec, SaeSpec

    specs = []
    for item in saes:
        name, _, path = item.partition("=")
        if not path:
            raise InvalidArgument(f"expected NAME=PATH, got {item!r}", field="--sae")
        specs.append(SaeSpec(name, path))
    for item in ffkvs:
        name, _, rest = item.partition("=")
        layer, _, k = rest.partition(":")
        if not layer.isdigit() or (k and not k.isdigit()):
            raise InvalidArgument(f"expected NAME=LAYER[:K], got {item!r}", field="--ffkv")
        specs.append(SaeSpec(name, "", ffkv_layer=int(layer), ffkv_k=int(k) if k else None))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    loaded, _ = load_spec_saes(ModelSpec(name="m", kind="causal_lm", path=model_dir, saes=tuple(specs)), model)
    return model, tok, loaded


def run(model_dir: str, saes: Sequence[str], ffkvs: Sequence[str], *, concept_world: int = 0, texts: Sequence[str] = (), png: str | None = None) -> dict[str, Any]:
    """The report: per dictionary, every metric the dataset allows; writes the PNG when asked."""
    from sae_runtime.training.activations import ActivationStore

    model, tok, loaded = _load(model_dir, saes, ffkvs)
    report: dict[str, Any] = {"model": model_dir, "dictionaries": {}}
    panels: dict[str, dict[str, list[float]]] = {}
    if concept_world:
        from sae_runtime.demo import world
        from sae_runtime.demo.dictionaries import ground_truth_embedding, measure, token_tags

        texts = [t.text for t in world.tagged_texts(concept_world, seed=4242)]
    if not texts:
        raise InvalidArgument("give --concept-world N or --texts FILE", field="dataset")
    lr_texts = list(texts[:128])
    for name, sae in loaded.items():
        store = ActivationStore.collect(model, tok, list(texts), sae.cfg.hook_name, batch_size=64, progress=False)
        x = store.tensor()
        if concept_world:
            tags, words = token_tags(tok, store.column("token_ids"), store.column("sequence"))
            entry = measure(model, tok, sae, x, tags, words, lr_texts)
            emb = ground_truth_embedding(words, tags)
        else:
            entry = reconstruction_metrics(sae, x, model=model, tokenizer=tok, texts=lr_texts).to_dict()
            emb = None
        report["dictionaries"][name] = entry
        panels[name] = latent_distributions(sae, x, emb)
    if png:
        ranges = {"log10 firing share": (-6.0, 0.0)}
        if concept_world:
            ranges = {"MS": (0.0, 1.0), **ranges}
        write_png(png, panels, ranges)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a causal LM directory (from_pretrained)")
    p.add_argument("--sae", action="append", default=[], help="NAME=PATH of an SAE directory (repeatable)")
    p.add_argument("--ffkv", action="append", default=[], help="NAME=LAYER[:K]: the MLP neurons of a layer (repeatable)")
    p.add_argument("--concept-world", type=int, default=0, help="evaluate on N tagged stories of the concept world")
    p.add_argument("--texts", default=None, help="a file of texts, one per line (reconstruction metrics only)")
    p.add_argument("--out", default="reports/dictionaries.json")
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    texts = [line for line in Path(args.texts).read_text().splitlines() if line.strip()] if args.texts else []
    report = run(args.model, args.sae, args.ffkv, concept_world=args.concept_world, texts=texts, png=args.png)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    for name, d in report["dictionaries"].items():
        print(name, " ".join(f"{k}={v:.3f}" for k, v in d.items() if isinstance(v, float)))
    print(f"wrote {out}" + (f" and {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
