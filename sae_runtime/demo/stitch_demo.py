"""The stitching demo: a second, narrower and deeper LM on the same concept world, a stitch from
the demo LM (A) to it (B), the concepts SAE transferred to B, and the figures of the paper.

Build (called by :func:`sae_runtime.demo.build.build`; writes ``<out>/demo-lm-b/``):

- ``model/``            LM B (hidden 64, 5 layers; A is 128 wide, 4 deep), same tokenizer
- ``stitch/``           the affine maps A.blocks.2.hook_resid_post <-> B's SVCCA-chosen layer
- ``saes/concepts/``    A's concepts SAE transferred to B (native format, A's labels)
- ``saes/native/``      a TopK SAE trained on B at that layer with A's recipe (the baseline;
                        it is the warm-start comparison's from-scratch run)
- ``risk/``             A's risk probe carried over to the transferred SAE
- ``manifest.json``     configs, SVCCA scores, stitch FVUs, the warm-start comparison, timings

:func:`evaluate` (called by :mod:`sae_runtime.demo.eval`, report key ``stitch``) measures on
held-out texts the zero-shot FVU and loss recovered of the transferred SAE against the native
one, and ``steer_share`` of the transferred ``color:*`` labels on B through the backend.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from sae_runtime.demo.train_lm import LmTrainConfig

NAME = "demo-lm-b"
MODEL_DIR, STITCH_DIR, SAE_NAME, NATIVE_NAME, RISK_DIR, MANIFEST = "model", "stitch", "concepts", "native", "risk", "manifest.json"


@dataclass(frozen=True)
class StitchDemoConfig:
    seed: int = 0
    lm: LmTrainConfig = field(default_factory=lambda: LmTrainConfig(hidden_size=64, intermediate_size=256, num_layers=5, num_heads=4, seed=1, min_steps=200, eval_every=100))
    stitch_texts: int = 3000
    stitch_steps: int = 400
    compare_eval_every: int = 100
    threads: int = 2

    def quick(self) -> "StitchDemoConfig":
        lm = replace(self.lm, max_steps=60, min_steps=0, eval_every=60, eval_items=20, hidden_size=24, intermediate_size=48, num_layers=3, num_heads=2)
        return replace(self, lm=lm, stitch_texts=80, stitch_steps=20, compare_eval_every=10)


def build_b(out: str | Path, model_a: Any, tok: Any, sae_a: Any, probe_a: Any, sae_cfg: Any, sae_texts: int, cfg: StitchDemoConfig = StitchDemoConfig(), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train LM B, fit the stitch, transfer the SAE and probe, train the baseline; write ``<out>/demo-lm-b``.

    ``sae_cfg`` is A's SAE TrainConfig (the baseline and the warm-start runs use it), ``sae_texts``
    the activation-store size A's SAE was trained on.
    """
    from sae_runtime.demo.build import sae_corpus
    from sae_runtime.demo.train_lm import fact_accuracy, train_lm
    from sae_runtime.demo import world
    from sae_runtime.formats import save_native
    from sae_runtime.stitch.maps import StitchConfig
    from sae_runtime.stitch.pipeline import collect, fit_between
    from sae_runtime.stitch.transfer import transfer_probe, transfer_sae
    from sae_runtime.stitch.warmstart import compare
    from sae_runtime.training.activations import ActivationStore

    started = time.perf_counter()
    root = Path(out) / NAME
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 1)
        log(f"[stitch:{name}] {timings[name]:.1f}s")
        t = time.perf_counter()

    model_b, lm_metrics = train_lm(tok, replace(cfg.lm, threads=cfg.threads), log=log)
    lm_metrics.pop("config", None)
    model_b.save_pretrained(str(root / MODEL_DIR))
    tok.save_pretrained(str(root / MODEL_DIR))
    lap("lm")

    hook_a = sae_a.cfg.hook_name
    stitch = fit_between(
        model_a, model_b, tok, sae_corpus(cfg.stitch_texts, cfg.seed + 50), hook_a, None,
        StitchConfig(steps=cfg.stitch_steps, seed=cfg.seed), names=("demo-lm", NAME),
    )  # fmt: skip
    stitch.meta["name"] = f"demo-lm.{hook_a}->{NAME}.{stitch.hook_b}"
    stitch.save(root / STITCH_DIR)
    transferred = transfer_sae(sae_a, stitch)
    save_native(transferred, root / "saes" / SAE_NAME)
    transfer_probe(probe_a, stitch).save(root / RISK_DIR)
    lap("stitch")

    texts = sae_corpus(sae_texts, cfg.seed + 10)  # the texts A's SAE was trained on
    n_eval = max(8, len(texts) // 20)
    store = ActivationStore.collect(model_b, tok, texts[n_eval:], stitch.hook_b, batch_size=64, max_length=128, model_name=NAME, progress=False)
    eval_acts = collect(model_b, tok, texts[:n_eval], stitch.hook_b)
    # the scratch run is the native SAE (the same run train_sae makes with this config)
    warm, trainer = compare(store, sae_cfg, eval_acts, transferred, stitch_flops=int(stitch.meta["flops"]), eval_every=cfg.compare_eval_every)
    save_native(trainer.to_sae(stitch.hook_b, NAME), root / "saes" / NATIVE_NAME)
    native = trainer.evaluate(eval_acts)
    lap("sae_runs")

    manifest = {
        "name": NAME,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "hook_a": hook_a,
        "hook_b": stitch.hook_b,
        "metrics": {
            "lm": lm_metrics | {"fact_accuracy_probe_set": fact_accuracy(model_b, tok, world.fact_items(200, cfg.seed + 40, mix=[("intact", 0.0)]))},
            "stitch": {k: v for k, v in stitch.meta.items() if k != "config"},
            "native_sae": {"fvu": native.fvu, "l0": native.l0, "dead_fraction": native.dead_fraction},
            "warm_start": warm,
        },
        "timings": timings,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    return manifest


# -- evaluation -----------------------------------------------------------------------------------
def load_backend_b(models: str | Path, batch: int = 64) -> Any:
    """Model B with the transferred SAE (as ``concepts``), the native SAE and the carried probe."""
    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec

    root = Path(models) / NAME
    spec = ModelSpec(
        name=NAME, kind="causal_lm", path=str(root / MODEL_DIR),
        saes=(SaeSpec(SAE_NAME, str(root / "saes" / SAE_NAME)), SaeSpec(NATIVE_NAME, str(root / "saes" / NATIVE_NAME))),
        risk_probe=str(root / RISK_DIR), limits=Limits(max_batch_size=batch, max_new_tokens=64),
    )  # fmt: skip
    return CausalLmBackend.from_spec(spec)


def evaluate(models: str | Path, eval_seed: int, steering: Callable[..., dict[str, Any]]) -> dict[str, Any] | None:
    """The ``stitch`` report (None when ``<models>/demo-lm-b`` was not built). ``steering`` is the
    demo eval's steering test, run on B with the transferred SAE's labels."""
    from sae_runtime.demo.build import sae_corpus
    from sae_runtime.training.evaluation import fvu, l0, loss_recovered_on_texts

    root = Path(models) / NAME
    if not (root / MANIFEST).is_file():
        return None
    manifest = json.loads((root / MANIFEST).read_text())
    backend = load_backend_b(models)
    texts = sae_corpus(256, eval_seed)
    hook = manifest["hook_b"]
    from sae_runtime.stitch.pipeline import collect

    x = collect(backend.model, backend.tokenizer, texts, hook)
    per_sae: dict[str, dict[str, float]] = {}
    for name in (SAE_NAME, NATIVE_NAME):
        sae = backend.saes[name]
        with torch.no_grad():
            f = sae.encode(x)
            rec = sae.decode(f)
        lr = loss_recovered_on_texts(backend.model, backend.tokenizer, texts[:128], hook, sae)
        per_sae[name] = {"fvu": fvu(x, rec), "l0": l0(f), "loss_recovered": lr.fraction, "loss_with_sae": lr.with_sae, "loss_clean": lr.clean}
    steer = steering(backend)
    warm = manifest["metrics"]["warm_start"]
    return {
        "pair": f"demo-lm.{manifest['hook_a']} -> {NAME}.{hook}",
        "widths": {"a": int(backend.saes[SAE_NAME].cfg.metadata.get("transferred_from", {}).get("d_in", 0)), "b": backend.saes[SAE_NAME].d_in},
        "svcca": manifest["metrics"]["stitch"].get("svcca"),
        "stitch_fvu": {k: manifest["metrics"]["stitch"][k] for k in ("fvu_up", "fvu_down", "fvu_round_a", "fvu_round_b")},
        "zero_shot": {"transferred": per_sae[SAE_NAME], "native": per_sae[NATIVE_NAME]},
        "steer_share": steer["steer_share"],
        "base_share": steer["base_share"],
        "steer_well_formed": steer["steer_well_formed"],
        "warm_start": {
            "target_fvu": warm["target_fvu"],
            "scratch_steps": warm["scratch"]["steps"], "transferred_init_steps": warm["transferred_init"]["steps"],
            "scratch_flops": warm["scratch"]["flops"], "transferred_init_flops": warm["transferred_init"]["flops"],
            "stitch_flops": warm["stitch_flops"], "saved_fraction": warm["saved_fraction"],
            "curves": {"scratch": warm["scratch"]["curve"], "transferred_init": warm["transferred_init"]["curve"]},
        },  # fmt: skip
        "lm_b_fact_accuracy": manifest["metrics"]["lm"]["fact_accuracy_probe_set"],
        "build_seconds": manifest["build_seconds"],
    }


__all__ = ["NAME", "StitchDemoConfig", "build_b", "evaluate", "load_backend_b"]
