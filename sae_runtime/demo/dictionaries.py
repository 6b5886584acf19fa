"""The demo LM's dictionaries side by side: top-k SAE, G-SAE, SpaDE and FF-KV (issue 13).

    python -m sae_runtime.demo.dictionaries --models models            # train + ship G-SAE, SpaDE
    python -m sae_runtime.demo.dictionaries --models models --compare  # the comparison only

Shipped under ``models/demo-lm/saes/``: ``gsae`` (topk-sigmoid, the first C latents reserved for
the C concept tags), ``spade`` and ``ffkv/labels.json`` (FF-KV itself is built from the LM's
layer-2 MLP at load time; only its neuron labels are stored). ``build.py`` calls
:func:`build_dictionaries` after the top-k SAE; ``eval.py`` calls :func:`compare` for
``dictionaries.<name>`` in its report. All figures are on held-out texts (seeds of ``eval.py``).

Per dictionary: ``l0``, ``fvu``, ``loss_recovered``, dead/dense shares, ``ms_mean`` (MS over the
latents firing on the held-out tokens; the input "encoder" is the ground truth of the concept
world: a one-hot of the token's word concatenated with the multi-hot of its concept tags),
``fms_at_1``/``fms_at_5`` (token-level, the 31 concept tags), ``absorption_fraction`` and
``full_absorption_rate`` (parents ``is:<family>``, children the family's words), ``steer_share``
and ``steer_well_formed`` (clamping the ``color:<c>`` latent to ``STEER_SCALE`` times its largest
held-out activation; for the G-SAE also a clamp at 1, the sigmoid's ceiling, and the paper's
norm-relative addition).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from sae_runtime.demo import world

GSAE, SPADE, FFKV, TOPK = "gsae", "spade", "ffkv", "concepts"
FFKV_LAYER = 2  # the MLP of the layer whose output the top-k SAE reads (blocks.2.hook_resid_post)
#: Clamp value of the steering comparison, as a multiple of the latent's largest held-out activation.
STEER_SCALE = 1.0
#: G-SAE norm-relative additive steering: alpha (the added vector is alpha ||x_n|| D_i / ||D_i||).
GSAE_ALPHA = 1.0


@dataclass(frozen=True)
class DictConfig:
    d_sae: int = 512
    k: int = 12  # G-SAE and FF-KV top-k, matched to the top-k SAE's L0
    gsae_steps: int = 800
    spade_steps: int = 300
    batch_size: int = 512
    texts: int = 2000
    label_texts: int = 2000
    seed: int = 0

    def quick(self) -> "DictConfig":
        return replace(self, d_sae=64, k=4, gsae_steps=20, spade_steps=10, batch_size=256, texts=80, label_texts=40)


def concepts() -> list[str]:
    """Every concept tag of the world, sorted (the G-SAE's reserved latents, in this order)."""
    return sorted(f"{fam}:{w}" for fam, words in world.FAMILIES.items() for w in words)


def token_tags(tokenizer: Any, ids: Tensor, sequence: Tensor) -> tuple[list[tuple[str, ...]], list[str]]:
    """(tags, word) of every stored row, from its token ids (the tags depend on the words alone)."""
    words = tokenizer.convert_ids_to_tokens(ids.tolist())
    bos = tokenizer.bos_token
    tags: list[tuple[str, ...]] = []
    out_words: list[str] = []
    _, counts = torch.unique_consecutive(sequence, return_counts=True)
    start = 0
    for n in counts.tolist():
        seq = words[start : start + n]
        start += n
        body = seq[1:] if seq and seq[0] == bos else seq
        tagged = world.tag_text(" ".join(body)).token_tags
        tags.extend(([()] if len(body) < len(seq) else []) + list(tagged))
        out_words.extend(seq)
    return tags, out_words


def label_matrix(tags: Sequence[Sequence[str]], names: Sequence[str]) -> Tensor:
    """(N, C) float 0/1: row n has concept c among its tags."""
    col = {c: j for j, c in enumerate(names)}
    y = torch.zeros(len(tags), len(names))
    for i, ts in enumerate(tags):
        for t in ts:
            if t in col:
                y[i, col[t]] = 1.0
    return y


# -- building ---------------------------------------------------------------------------------
def build_dictionaries(
    model: Any, tokenizer: Any, root: Path, hook: str, cfg: DictConfig = DictConfig(), log: Callable[[str], None] = print,
    store: Any = None,
) -> dict[str, Any]:
    """Train the G-SAE and SpaDE on ``hook`` activations, label SpaDE and FF-KV, ship under
    ``root/saes``; returns their training metrics (for the manifest). ``store``: the build's
    activation store (reused when given, else collected from the build's corpus)."""
    from sae_runtime.demo.build import sae_corpus, tagged_tokens
    from sae_runtime.formats import save_native
    from sae_runtime.saes.ffkv import ffkv_from_model
    from sae_runtime.training.activations import ActivationStore
    from sae_runtime.training.gsae import GsaeTrainConfig, train_gsae
    from sae_runtime.training.labelling import label_sae_on_tokens
    from sae_runtime.training.spade import SpadeTrainConfig, train_spade

    started = time.perf_counter()
    if store is None:
        store = ActivationStore.collect(model, tokenizer, sae_corpus(cfg.texts, cfg.seed + 10), hook, batch_size=64, progress=False)
    x = store.tensor()
    tags, _ = token_tags(tokenizer, store.column("token_ids"), store.column("sequence"))
    names = concepts()
    y = label_matrix(tags, names)
    out: dict[str, Any] = {}

    t = time.perf_counter()
    gcfg = GsaeTrainConfig(d_sae=cfg.d_sae, k=cfg.k, steps=cfg.gsae_steps, batch_size=cfg.batch_size, seed=cfg.seed)
    gsae, g_hist = train_gsae(x, y, names, gcfg, hook_name=hook, model_name="demo-lm")
    save_native(gsae, root / "saes" / GSAE)
    out[GSAE] = {"history": g_hist[-1], "n_concepts": len(names), "seconds": round(time.perf_counter() - t, 1)}
    log(f"[gsae] {out[GSAE]}")

    t = time.perf_counter()
    scfg = SpadeTrainConfig(d_sae=cfg.d_sae, steps=cfg.spade_steps, batch_size=cfg.batch_size, seed=cfg.seed)
    spade, s_hist = train_spade(x, scfg, hook_name=hook, model_name="demo-lm")
    tagged = tagged_tokens(tokenizer, world.tagged_texts(cfg.label_texts, seed=cfg.seed + 20))
    label_sae_on_tokens(model, spade, hook, tagged, pad_id=tokenizer.pad_token_id, batch_size=64)
    save_native(spade, root / "saes" / SPADE)
    out[SPADE] = {"history": s_hist[-1], "n_labelled": len(spade.labels), "seconds": round(time.perf_counter() - t, 1)}
    log(f"[spade] {out[SPADE]}")

    t = time.perf_counter()
    ffkv = ffkv_from_model(model, FFKV_LAYER, cfg.k)
    label_sae_on_tokens(model, ffkv, ffkv.cfg.hook_name, tagged, pad_id=tokenizer.pad_token_id, batch_size=64)
    (root / "saes" / FFKV).mkdir(parents=True, exist_ok=True)
    (root / "saes" / FFKV / "labels.json").write_text(json.dumps({"layer": FFKV_LAYER, "k": cfg.k, "labels": ffkv.labels}, indent=1))
    out[FFKV] = {"layer": FFKV_LAYER, "k": cfg.k, "n_labelled": len(ffkv.labels), "seconds": round(time.perf_counter() - t, 1)}
    out["config"] = asdict(cfg)
    out["seconds"] = round(time.perf_counter() - started, 1)
    log(f"[dictionaries] {out['seconds']}s")
    return out


# -- loading ----------------------------------------------------------------------------------
def dictionary_specs(models: str | Path, k: int | None = None) -> tuple:
    """The SaeSpecs of all four dictionaries (FF-KV's k from its labels file unless given)."""
    from sae_runtime.backends.spec import SaeSpec

    saes = Path(models) / "demo-lm" / "saes"
    kv = json.loads((saes / FFKV / "labels.json").read_text())
    return (
        SaeSpec(TOPK, str(saes / TOPK)),
        SaeSpec(GSAE, str(saes / GSAE)),
        SaeSpec(SPADE, str(saes / SPADE)),
        SaeSpec(FFKV, str(saes / FFKV), ffkv_layer=int(kv["layer"]), ffkv_k=k if k is not None else kv.get("k")),
    )


def load_backend(models: str | Path, batch: int = 64):
    """A CausalLmBackend over the demo LM with all four dictionaries and the risk probe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.loading import load_spec_saes
    from sae_runtime.backends.spec import Limits, ModelSpec
    from sae_runtime.demo.build import MODEL_DIR, RISK_DIR
    from sae_runtime.risk import RiskProbe

    root = Path(models) / "demo-lm"
    limits = Limits(max_batch_size=batch, max_new_tokens=64)
    spec = ModelSpec(name="demo-lm", kind="causal_lm", path=str(root / MODEL_DIR), saes=dictionary_specs(models), limits=limits)
    model = AutoModelForCausalLM.from_pretrained(spec.path).eval()
    tok = AutoTokenizer.from_pretrained(spec.path)
    saes, _ = load_spec_saes(spec, model)
    return CausalLmBackend(model, tok, saes, risk_probe=RiskProbe.load(root / RISK_DIR), name="demo-lm", limits=limits)


# -- comparison -------------------------------------------------------------------------------
def _decoder_and_scales(sae: Any, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Decoder rows in the target's space (d_sae, d_target) and per-token scales (N,) or None."""
    from sae_runtime.metrics import target_of

    rows = target_of(sae, sae.decoder_rows().detach())
    norm = sae.normalize(x)[1]
    if norm is None:
        return rows, None
    return rows, norm.scale.reshape(-1)


def ground_truth_embedding(words: Sequence[str], tags: Sequence[Sequence[str]]) -> Tensor:
    """The MS input encoder of the concept world: one-hot word, then multi-hot concept tags."""
    vocab = {w: i for i, w in enumerate(["<bos>", *world.vocabulary()])}
    names = {c: i for i, c in enumerate(concepts())}
    e = torch.zeros(len(words), len(vocab) + len(names))
    for i, (w, ts) in enumerate(zip(words, tags)):
        e[i, vocab.get(w, 0)] = 1.0
        for t in ts:
            e[i, len(vocab) + names[t]] = 1.0
    return e


def measure(model: Any, tokenizer: Any, sae: Any, x: Tensor, tags: Sequence[Sequence[str]], words: Sequence[str], lr_texts: Sequence[str]) -> dict[str, Any]:
    """Reconstruction, MS, FMS and absorption of one dictionary on rows x (N, d_in) of its site."""
    from sae_runtime.metrics import dictionary_outputs, reconstruction_metrics, target_of
    from sae_runtime.metrics.absorption import absorption
    from sae_runtime.metrics.fms import fms
    from sae_runtime.metrics.ms import monosemanticity, summarise

    rec = reconstruction_metrics(sae, x, model=model, tokenizer=tokenizer, texts=lr_texts, hook_name=sae.cfg.hook_name)
    f, _ = dictionary_outputs(sae, x)
    ms = summarise(monosemanticity(f, ground_truth_embedding(words, tags)))
    names = concepts()
    y = label_matrix(tags, names).bool()
    fms_report = fms(f, {c: y[:, j] for j, c in enumerate(names)})
    parents = {p: torch.tensor([w in children for w in words]) for p, children in world.PARENT_CONCEPTS.items()}
    dec, scales = _decoder_and_scales(sae, x)
    ab = absorption(target_of(sae, x), f, dec, parents, scales=scales)
    return {
        "architecture": sae.cfg.architecture, "d_sae": sae.d_sae, "hook_name": sae.cfg.hook_name,
        "l0": rec.l0, "fvu": rec.fvu, "loss_recovered": rec.loss_recovered,
        "dead_share": rec.dead_share, "dense_share": rec.dense_share,
        "ms_mean": ms.mean, "ms_std": ms.std, "ms_scored": ms.n_scored,
        "fms_at_1": fms_report.fms_at_1, "fms_at_5": fms_report.fms_at_5,
        "fms_per_concept": fms_report.to_dict()["per_concept"],
        "absorption_fraction": ab.absorption_fraction, "full_absorption_rate": ab.full_absorption_rate,
        "absorption_per_parent": ab.to_dict()["per_parent"],
        "n_tokens": rec.n_tokens,
    }  # fmt: skip


def _steer(backend: Any, name: str, f: Tensor, n_prompts: int) -> dict[str, Any]:
    from sae_runtime.demo.eval import steering_eval
    from sae_runtime.plan import EditOp

    sae = backend.saes[name]
    colours = world.FAMILIES["color"]
    if not all(f"color:{c}" in sae.labels for c in colours):
        return {"steer_share": None, "steer_well_formed": None, "note": "not every colour has a labelled latent"}
    values = {c: STEER_SCALE * float(f[:, sae.labels[f"color:{c}"]].max()) for c in colours}
    r = steering_eval(backend, n_prompts=n_prompts, sae=name, values=values)
    out = {"steer_share": r["steer_share"], "base_share": r["base_share"], "steer_well_formed": r["steer_well_formed"]["steered"],
           "steer_values": values, "steer_per_colour_share": {c: v["share"] for c, v in r["steer_per_colour"].items()}}  # fmt: skip
    if sae.cfg.architecture == "topk-sigmoid":
        a = steering_eval(backend, n_prompts=n_prompts, sae=name, op=EditOp.ADD, normalize=True, value=GSAE_ALPHA)
        out["steer_additive"] = {"alpha": GSAE_ALPHA, "steer_share": a["steer_share"], "steer_well_formed": a["steer_well_formed"]["steered"]}
        one = steering_eval(backend, n_prompts=n_prompts, sae=name, value=1.0)  # the sigmoid's ceiling
        out["steer_clamp_at_1"] = {"value": 1.0, "steer_share": one["steer_share"], "steer_well_formed": one["steer_well_formed"]["steered"]}
    return out


def compare(models: str | Path, n_texts: int = 200, n_prompts: int = 30, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``dictionaries.<name>`` figures for the four dictionaries, on held-out texts."""
    from sae_runtime.demo.build import sae_corpus
    from sae_runtime.demo.eval import EVAL_SEED
    from sae_runtime.metrics import dictionary_outputs
    from sae_runtime.training.activations import ActivationStore

    if not (Path(models) / "demo-lm" / "saes" / FFKV / "labels.json").is_file():
        log("[dictionaries] not built: skipped")
        return {}
    backend = load_backend(models)
    texts = [t.text for t in world.tagged_texts(n_texts, seed=EVAL_SEED + 5)]
    lr_texts = sae_corpus(128, EVAL_SEED + 4)
    report: dict[str, Any] = {}
    for name in (TOPK, GSAE, SPADE, FFKV):
        t = time.perf_counter()
        sae = backend.saes[name]
        store = ActivationStore.collect(backend.model, backend.tokenizer, texts, sae.cfg.hook_name, batch_size=64, progress=False)
        tags, words = token_tags(backend.tokenizer, store.column("token_ids"), store.column("sequence"))
        x = store.tensor()
        report[name] = measure(backend.model, backend.tokenizer, sae, x, tags, words, lr_texts)
        report[name].update(_steer(backend, name, dictionary_outputs(sae, x)[0], n_prompts))
        report[name]["seconds"] = round(time.perf_counter() - t, 1)
        log(f"[{name}] " + " ".join(f"{k}={v:.3f}" for k, v in report[name].items() if isinstance(v, float)))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.dictionaries", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models")
    p.add_argument("--compare", action="store_true", help="only the comparison (the dictionaries are shipped)")
    p.add_argument("--out", default=None, help="write the comparison JSON here")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    root = Path(args.models) / "demo-lm"
    if not args.compare:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sae_runtime.demo.build import HOOK, MANIFEST, MODEL_DIR

        model = AutoModelForCausalLM.from_pretrained(str(root / MODEL_DIR)).eval()
        tok = AutoTokenizer.from_pretrained(str(root / MODEL_DIR))
        cfg = DictConfig().quick() if args.quick else DictConfig()
        metrics = build_dictionaries(model, tok, root, HOOK, cfg)
        manifest_path = root / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            manifest["metrics"]["dictionaries"] = metrics
            manifest["timings"]["dictionaries"] = metrics["seconds"]
            manifest_path.write_text(json.dumps(manifest, indent=2, default=float))
    if args.compare or args.out:
        report = compare(args.models)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
