"""Build the embedded demo models from a fixed seed: LM, SAE, feature labels, risk probe.

    python -m sae_runtime.demo.build --out models [--seed 0] [--quick]

Writes, under ``<out>/demo-lm/``:

- ``model/``            the Llama-architecture LM and its word-level tokenizer (save_pretrained, safetensors)
- ``saes/concepts/``    a TopK SAE on ``blocks.2.hook_resid_post``, native format, with concept labels
- ``saes/gsae/``, ``saes/spade/``, ``saes/ffkv/labels.json``  the other dictionaries (:mod:`.dictionaries`)
- ``risk/``             the hallucination-risk probe (risk_probe.json + .safetensors)
- ``vectors/``          DiffMean steering vectors (:mod:`.vectors`), e.g. ``red.safetensors``
- ``manifest.json``     seed, library versions, configs, metrics and ``build_seconds``

and ``<out>/demo-lm-b/``, the stitching demo (:mod:`.stitch_demo`: a second LM, the stitch, the
SAE and probe transferred to it, a native SAE on it).

Steps: train the LM on the concept world (:mod:`.train_lm`); collect activations at the hook
over stories and fact documents; train the SAE (:mod:`sae_runtime.training`); label latents with
token-level concept tags; generate greedy answers to fact prompts of every uncertainty level,
label each hallucinated or not (:func:`world.is_hallucinated`) and fit the probe on the pooled
latents of prompt + answer (:mod:`.probe_build`, which adds contexts in other layouts). Everything runs on CPU; ``--quick`` shrinks every step (smoke tests).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sae_runtime.demo import world
from sae_runtime.demo.dictionaries import DictConfig, build_dictionaries
from sae_runtime.demo.tokenizer import build_tokenizer
from sae_runtime.demo.stitch_demo import StitchDemoConfig
from sae_runtime.demo.train_lm import LmTrainConfig, fact_accuracy, greedy_generate, train_lm

MODEL_DIR = "model"
SAE_NAME = "concepts"
RISK_DIR = "risk"
MANIFEST = "manifest.json"
HOOK = "blocks.2.hook_resid_post"


@dataclass(frozen=True)
class BuildConfig:
    """Sizes of every step. Seeds derive from ``seed`` (LM, data, SAE, probe split)."""

    seed: int = 0
    lm: LmTrainConfig = field(default_factory=LmTrainConfig)
    hook: str = HOOK
    sae_architecture: str = "topk"
    d_sae: int = 512
    k: int = 12
    sae_steps: int = 3000
    sae_batch_size: int = 1024
    sae_lr: float = 2e-3
    sae_texts: int = 6000  # stories + fact documents for the activation store
    label_texts: int = 2000  # tagged stories for labelling
    probe_items: int = 7200  # fact prompts for the probe (3600 gave a held-out AUROC 0.01 lower)
    threads: int = 2
    dictionaries: DictConfig = field(default_factory=DictConfig)  # G-SAE, SpaDE, FF-KV labels
    stitch: StitchDemoConfig | None = field(default_factory=StitchDemoConfig)  # None: no model B

    def quick(self) -> "BuildConfig":
        """A tiny build for smoke tests (seconds, not minutes; quality not checked)."""
        lm = replace(self.lm, max_steps=100, min_steps=0, eval_every=100, eval_items=20, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2)
        stitch = self.stitch.quick() if self.stitch is not None else None
        return replace(self, lm=lm, d_sae=64, k=4, sae_steps=30, sae_batch_size=256, sae_texts=120, label_texts=60, probe_items=96,
                       dictionaries=self.dictionaries.quick(), stitch=stitch)


def _versions() -> dict[str, str]:
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def sae_corpus(n: int, seed: int) -> list[str]:
    """Texts for the activation store: 60% stories, 20% fact documents (as trained on), 20% fact
    prompts of every uncertainty level, shuffled."""
    rng = random.Random(seed)
    n_stories, n_docs = int(n * 0.6), int(n * 0.2)
    texts = [t.text for t in world.tagged_texts(n_stories, seed=rng.randrange(2**31))]
    texts += world.training_texts(n_docs, seed=rng.randrange(2**31), fact_fraction=1.0)
    texts += [it.prompt for it in world.fact_items(n - len(texts), seed=rng.randrange(2**31))]
    rng.shuffle(texts)
    return texts


def tagged_tokens(tok: Any, texts: Sequence[world.TaggedText]) -> list[tuple[list[int], list[tuple[str, ...]]]]:
    """(token ids, tags per token) for labelling; ``<bos>`` carries no tag."""
    out = []
    for t in texts:
        ids = tok(t.text)["input_ids"]
        tags = [(), *t.token_tags]
        assert len(ids) == len(tags), (len(ids), len(tags))
        out.append((ids, tags))
    return out


def first_sentence_completion(text: str) -> str:
    """A completion cut after its first ``.`` (the answer sentence)."""
    words = text.split()
    return " ".join(words[: words.index(".") + 1]) if "." in words else " ".join(words)


def answer_items(model: Any, tok: Any, items: Sequence[world.FactItem]) -> tuple[list[str], list[int]]:
    """Greedy answers (up to the first ``.``) and hallucination labels (1 = hallucinated)."""
    completions = [first_sentence_completion(c) for c in greedy_generate(model, tok, [it.prompt for it in items], max_new_tokens=3)]
    return completions, [int(world.is_hallucinated(it, c)) for it, c in zip(items, completions)]


def build(
    out: str | Path,
    cfg: BuildConfig = BuildConfig(),
    log: Callable[[str], None] = print,
    progress: bool = False,
    lm_from: str | Path | None = None,
) -> dict[str, Any]:
    """Run every step and write ``<out>/demo-lm``; returns the manifest.

    ``lm_from`` reuses the LM of an earlier build (its ``model`` directory) instead of training one.
    """
    from sae_runtime.demo.probe_build import fit_demo_probe
    from sae_runtime.demo.stitch_demo import build_b
    from sae_runtime.formats import save_native
    from sae_runtime.training.activations import ActivationStore
    from sae_runtime.training.evaluation import loss_recovered_on_texts
    from sae_runtime.training.labelling import label_sae_on_tokens
    from sae_runtime.training.trainer import TrainConfig, train_sae

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    root = Path(out) / "demo-lm"
    model_dir, sae_dir, risk_dir = root / MODEL_DIR, root / "saes" / SAE_NAME, root / RISK_DIR
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        log(f"[{name}] {timings[name]:.1f}s")
        return now

    # 1. the LM --------------------------------------------------------------------------------
    t = time.perf_counter()
    if lm_from is None:
        tok = build_tokenizer()
        model, lm_metrics = train_lm(tok, replace(cfg.lm, seed=cfg.seed, threads=cfg.threads), log=log)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(lm_from))
        model = AutoModelForCausalLM.from_pretrained(str(lm_from)).eval()
        lm_metrics = {"reused_from": str(lm_from)}
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    t = lap("lm", t)

    # 2. activations and the SAE ------------------------------------------------------------------
    texts = sae_corpus(cfg.sae_texts, cfg.seed + 10)
    n_eval = max(8, len(texts) // 20)
    train_texts, eval_texts = texts[n_eval:], texts[:n_eval]
    common: dict[str, Any] = dict(batch_size=64, max_length=128, model_name="demo-lm", progress=progress)
    store = ActivationStore.collect(model, tok, train_texts, cfg.hook, **common)
    eval_acts = ActivationStore.collect(model, tok, eval_texts, cfg.hook, **common).tensor()
    sae_cfg = TrainConfig(
        architecture=cfg.sae_architecture, d_sae=cfg.d_sae, k=cfg.k, steps=cfg.sae_steps,
        batch_size=cfg.sae_batch_size, lr=cfg.sae_lr, seed=cfg.seed, dead_after_tokens=200_000,
    )  # fmt: skip
    result = train_sae(store, sae_cfg, hook_name=cfg.hook, model_name="demo-lm", eval_acts=eval_acts, progress=progress)
    sae = result.sae.eval()
    lr = loss_recovered_on_texts(model, tok, eval_texts[:128], cfg.hook, sae)
    t = lap("sae", t)

    # 3. labels -------------------------------------------------------------------------------
    tagged = world.tagged_texts(cfg.label_texts, seed=cfg.seed + 20)
    table = label_sae_on_tokens(model, sae, cfg.hook, tagged_tokens(tok, tagged), pad_id=tok.pad_token_id, batch_size=64)
    save_native(sae, sae_dir)
    t = lap("labels", t)
    dictionaries = build_dictionaries(model, tok, root, cfg.hook, cfg.dictionaries, log=log, store=store)
    t = lap("dictionaries", t)

    # 4. the risk probe (sae_runtime.demo.probe_build) -------------------------------------------
    probe, risk_metrics = fit_demo_probe(model, tok, sae, SAE_NAME, cfg.probe_items, cfg.seed + 30, progress)
    probe.save(risk_dir)
    t = lap("risk", t)
    from sae_runtime.demo.vectors import build_vectors

    build_vectors(root / MODEL_DIR, root / "vectors")  # the DiffMean steering vectors (sae_runtime.demo.vectors)
    t = lap("vectors", t)

    f = result.report.final
    build_seconds = round(time.perf_counter() - t_start, 1)
    manifest = {
        "name": "demo-lm",
        "seed": cfg.seed,
        "hook": cfg.hook,
        "sae": SAE_NAME,
        "versions": _versions(),
        "config": asdict(cfg),
        "metrics": {
            "lm": lm_metrics | {"fact_accuracy_probe_set": fact_accuracy(model, tok, world.fact_items(200, cfg.seed + 40, mix=[("intact", 0.0)]))},
            "sae": {"l0": f.l0, "fvu": f.fvu, "dead_fraction": f.dead_fraction, "loss_recovered": lr.fraction,
                    "loss_clean": lr.clean, "loss_with_sae": lr.with_sae, "loss_zero_ablated": lr.zero_ablated},  # fmt: skip
            "labels": {"n_labelled": len(table.by_concept), "concepts": table.rows()},
            "risk": risk_metrics,
            "dictionaries": dictionaries,
        },
        "timings": timings,
        "build_seconds": build_seconds,
    }
    manifest["metrics"]["lm"].pop("config", None)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    val_auroc = risk_metrics["val_auroc"]
    log(
        f"LM fact accuracy {manifest['metrics']['lm']['fact_accuracy_probe_set']:.3f}  SAE L0 {f.l0:.1f} FVU {f.fvu:.3f} "
        f"loss recovered {lr.fraction:.3f}  probe val AUROC {val_auroc['prompt']:.3f}/{val_auroc['final']:.3f}"
    )
    log(f"build_seconds {build_seconds}")
    # 5. the stitching demo's model B (sae_runtime.demo.stitch_demo, <out>/demo-lm-b) ------------
    if cfg.stitch is not None:
        build_b(out, model, tok, sae, probe, sae_cfg, cfg.sae_texts, replace(cfg.stitch, seed=cfg.seed, threads=cfg.threads), log)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--lm-from", default=None, help="reuse this LM directory instead of training one (development)")
    args = p.parse_args(argv)
    cfg = BuildConfig(seed=args.seed)
    build(args.out, cfg.quick() if args.quick else cfg, progress=args.progress, lm_from=args.lm_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
