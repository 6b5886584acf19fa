"""Evaluate the shipped demo models through the causal-LM backend; write a JSON report.

    python -m sae_runtime.demo.eval --models models --out reports/demo_eval.json

Everything goes through :class:`CausalLmBackend` (the service's code path): the model, SAE and
probe are loaded from ``<models>/demo-lm`` with ``from_pretrained`` / ``load_sae`` /
``RiskProbe.load``. Items use seeds disjoint from the build's, so every figure is held out.

- ``fact_accuracy``: greedy answers to intact-context fact questions that state the fact's value.
- ``steer_share``: for each colour, clamp (``set``) the latent labelled ``color:<colour>`` to
  ``steer_value`` at every position and sample story continuations; the share of that colour among
  the generated colour words, averaged over colours (``base_share``: the same share without edits,
  same seeds). ``steer_well_formed``: share of complete generated sentences that follow the world's
  grammar, steered vs base.
- ``risk_auroc``: AUROC of the probe's prompt-head score (``risk_prompt``, computed by the backend
  before anything is generated) against "the greedy answer is hallucinated", over fact prompts of
  every uncertainty level; ``risk_auroc_final`` for the final head.
- ``risk_top_quartile``: the mean final risk of the riskiest quarter of those prompts, without and
  with mitigation (the reference's measure of mitigation).
- ``halluc_rate`` on those prompts, and ``halluc_rate_mitigated`` with ``mitigate_risk_top_n``
  (ablating the probe's most risk-positive latents during generation).
- ``sae_l0``, ``sae_fvu``, ``sae_loss_recovered`` on held-out texts; ``build_seconds`` from the
  build manifest.
- ``mitigation`` (:mod:`.mitigation_eval`): the per-request mitigation's risk-coverage curve and
  default, and ``risk_auroc_held_out``, the probe's AUROC on context layouts it was not fitted on.
- ``stitch`` (:mod:`.stitch_demo`): the SAE transferred to the second demo LM against a native one.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from sae_runtime.backends.causal_lm import CausalLmBackend
from sae_runtime.backends.spec import EngineConfig, Limits, ModelSpec, SaeSpec
from sae_runtime.backends.types import SamplingParams, TextRequest
from sae_runtime.demo import dictionaries, mitigation_eval, stitch_demo, world
from sae_runtime.demo.build import MANIFEST, MODEL_DIR, RISK_DIR, SAE_NAME, first_sentence_completion
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit

#: Clamp value of the steering test (the colour latents reach about 10-60 on stories).
STEER_VALUE = 60.0
#: The headline figures decode greedily (like fact_accuracy); ``steer_sampled`` repeats the test
#: sampling at temperature 1 (seed i for prompt i, steered and base alike).
STEER_TEMPERATURE = 0.0
SAMPLED_TEMPERATURE = 1.0
MITIGATE_TOP_N = 10
EVAL_SEED = 1000  # disjoint from the build's seeds (seed + 0..40)


def load_backend(models: str | Path, batch: int = 64) -> CausalLmBackend:
    root = Path(models) / "demo-lm"
    spec = ModelSpec(
        name="demo-lm",
        kind="causal_lm",
        path=str(root / MODEL_DIR),
        saes=(SaeSpec(SAE_NAME, str(root / "saes" / SAE_NAME)),),
        risk_probe=str(root / RISK_DIR),
        limits=Limits(max_batch_size=batch, max_new_tokens=64),
        engine=EngineConfig(max_running_rows=batch),
    )
    return CausalLmBackend.from_spec(spec)


def story_prompts(n: int, seed: int) -> list[str]:
    """Story openings without any colour word: 0-2 colour-free sentences, then ``the`` or ``a``."""
    rng = random.Random(seed)
    colour_free = [t for t in world.STORY_TEMPLATES if "{color}" not in t]
    animals = world.FAMILIES["animal"]
    out = []
    for _ in range(n):
        sentences = [
            t.format(animal=rng.choice(animals), place=rng.choice(world.FAMILIES["place"]), mood=rng.choice(world.FAMILIES["mood"]), action=rng.choice(world.FAMILIES["action"]))
            for t in rng.choices(colour_free, k=rng.randint(0, 2))
        ]
        out.append(" ".join([*sentences, rng.choice(["the", "a"])]))
    return out


def _generate(backend: CausalLmBackend, prompts: Sequence[str], plan: InterventionPlan, sampling: SamplingParams, seeded: bool = False, mitigate: int = 0) -> list[Any]:
    requests = [
        backend.validate(TextRequest(prompt=p, plan=plan, sampling=replace(sampling, seed=i if seeded else None), mitigate_risk_top_n=mitigate))
        for i, p in enumerate(prompts)
    ]
    return backend.generate(requests)


def _well_formed_share(prompts: Sequence[str], texts: Sequence[str]) -> float:
    """Share of well-formed complete sentences in the continuations, each read from the start of
    the sentence the prompt leaves open (``the`` + ``red fox runs .``)."""
    sentences = []
    for p, t in zip(prompts, texts):
        words = p.split()
        tail = words[len(words) - words[::-1].index(".") :] if "." in words else words
        sentences += world.sentences(" ".join([*tail, t]))
    return sum(map(world.is_well_formed, sentences)) / max(len(sentences), 1)


def steering_eval(
    backend: CausalLmBackend, n_prompts: int = 60, value: float = STEER_VALUE, max_new_tokens: int = 24, temperature: float = STEER_TEMPERATURE,
    sae: str = SAE_NAME, op: EditOp = EditOp.SET, normalize: bool = False, values: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per-colour shares with the ``color:<c>`` latent clamped to ``value``, and without edits.

    Continuations are decoded at ``temperature`` (0 = greedy) with seed i for prompt i, steered and
    base alike. ``sae``/``op``/``normalize`` choose the dictionary and the edit (default: clamp the
    concepts SAE); ``values`` gives a value per colour instead of ``value``. ``base_share`` averages each colour's base share over the colours, so it is 1/6
    by construction; ``steer_per_colour`` has each colour's own base share.
    """
    prompts = story_prompts(n_prompts, EVAL_SEED + 1)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    base = [r.steered.text for r in _generate(backend, prompts, InterventionPlan(), sampling, seeded=True)]
    base_colours = [w for t in base for w in world.words_of(t, "color")]
    per_colour: dict[str, dict[str, float]] = {}
    steered_wf = []
    for c in world.FAMILIES["color"]:
        v = value if values is None else values[c]
        plan = InterventionPlan(edits=(LatentEdit(sae=sae, op=op, labels=(f"color:{c}",), value=v, normalize=normalize),))
        texts = [r.steered.text for r in _generate(backend, prompts, plan, sampling, seeded=True)]
        colours = [w for t in texts for w in world.words_of(t, "color")]
        per_colour[c] = {
            "latent": backend.saes[sae].labels[f"color:{c}"],
            "share": colours.count(c) / max(len(colours), 1),
            "base_share": base_colours.count(c) / max(len(base_colours), 1),
            "colour_words": len(colours),
            "well_formed": _well_formed_share(prompts, texts),
        }
        steered_wf.append(per_colour[c]["well_formed"])
    k = len(per_colour)
    return {
        "steer_share": sum(v["share"] for v in per_colour.values()) / k,
        "base_share": sum(v["base_share"] for v in per_colour.values()) / k,
        "steer_well_formed": {"steered": sum(steered_wf) / k, "base": _well_formed_share(prompts, base)},
        "steer_value": value,
        "steer_temperature": temperature,
        "steer_per_colour": per_colour,
        "steer_example": {"prompt": prompts[0], "base": base[0]},
    }


def fact_eval(backend: CausalLmBackend, n_intact: int = 300, n_mixed: int = 600, mitigate: int = MITIGATE_TOP_N) -> dict[str, Any]:
    """Fact accuracy, risk AUROC (prompt and final heads), hallucination rates."""
    from sae_runtime.risk import auroc

    greedy = SamplingParams(max_new_tokens=2, temperature=0.0)
    intact = world.fact_items(n_intact, EVAL_SEED + 2, mix=[("intact", 0.0)])
    answers = [r.steered.text for r in _generate(backend, [it.prompt for it in intact], InterventionPlan(), greedy)]
    accuracy = sum(world.is_correct(it, a) for it, a in zip(intact, answers)) / len(intact)

    items = world.fact_items(n_mixed, EVAL_SEED + 3)
    results = _generate(backend, [it.prompt for it in items], InterventionPlan(), greedy)
    labels = [int(world.is_hallucinated(it, first_sentence_completion(r.steered.text))) for it, r in zip(items, results)]
    y = torch.tensor(labels)
    risk_prompt = torch.tensor([r.risk_prompt.probability for r in results])
    risk_final = torch.tensor([r.risk_final.probability for r in results])
    mitigated = _generate(backend, [it.prompt for it in items], InterventionPlan(), greedy, mitigate=mitigate)
    mitigated_labels = [int(world.is_hallucinated(it, first_sentence_completion(r.steered.text))) for it, r in zip(items, mitigated)]
    by_level: dict[str, dict[str, float]] = {}
    for i, it in enumerate(items):
        key = it.variant if it.variant != "noise" else f"noise_{it.noise:g}"
        d = by_level.setdefault(key, {"n": 0, "halluc_rate": 0.0, "halluc_rate_mitigated": 0.0, "mean_risk": 0.0})
        d["n"] += 1
        d["halluc_rate"] += labels[i]
        d["halluc_rate_mitigated"] += mitigated_labels[i]
        d["mean_risk"] += float(risk_prompt[i])
    for d in by_level.values():
        for key in ("halluc_rate", "halluc_rate_mitigated", "mean_risk"):
            d[key] /= d["n"]
    return {
        "fact_accuracy": accuracy,
        "risk_auroc": auroc(risk_prompt, y),
        "risk_auroc_final": auroc(risk_final, y),
        "halluc_rate": float(y.float().mean()),
        "halluc_rate_mitigated": sum(mitigated_labels) / len(mitigated_labels),
        "mitigate_top_n": mitigate,
        "risk_top_quartile": top_quartile_risk(risk_final, torch.tensor([r.risk_final.probability for r in mitigated])),
        "n_fact_items": {"intact": len(intact), "mixed": len(items)},
        "by_uncertainty": by_level,
    }


def top_quartile_risk(base: torch.Tensor, mitigated: torch.Tensor) -> dict[str, float]:
    """Mean final risk of the quarter of items the base run scored riskiest, without and with
    mitigation (the probe reads the after-edit latents, so part of any drop is the ablation
    removing the very latents it weighs)."""
    top = torch.argsort(base, descending=True)[: max(1, base.numel() // 4)]
    return {"base": float(base[top].mean()), "mitigated": float(mitigated[top].mean())}


def sae_eval(backend: CausalLmBackend, n_texts: int = 256) -> dict[str, float]:
    """L0 and FVU of the SAE on held-out activations, and loss recovered, on fresh world texts."""
    from sae_runtime.training.activations import ActivationStore
    from sae_runtime.training.evaluation import fvu, l0, loss_recovered_on_texts

    from sae_runtime.demo.build import sae_corpus

    sae = backend.saes[SAE_NAME]
    hook = sae.cfg.hook_name
    texts = sae_corpus(n_texts, EVAL_SEED + 4)
    x = ActivationStore.collect(backend.model, backend.tokenizer, texts, hook, batch_size=64, progress=False).tensor()
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f, sae.normalize(x)[1])
    lr = loss_recovered_on_texts(backend.model, backend.tokenizer, texts[:128], hook, sae)
    return {"sae_l0": l0(f), "sae_fvu": fvu(x, x_hat), "sae_loss_recovered": lr.fraction}


def evaluate(models: str | Path, steer_value: float = STEER_VALUE, steer_temperature: float = STEER_TEMPERATURE) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(2)
    backend = load_backend(models)
    manifest_path = Path(models) / "demo-lm" / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    report: dict[str, Any] = {}
    report.update(fact_eval(backend))
    report.update(steering_eval(backend, value=steer_value, temperature=steer_temperature))
    sampled = steering_eval(backend, value=steer_value, temperature=SAMPLED_TEMPERATURE)
    report["steer_sampled"] = {k: sampled[k] for k in ("steer_share", "base_share", "steer_well_formed", "steer_temperature")} | {
        "per_colour_share": {c: v["share"] for c, v in sampled["steer_per_colour"].items()}
    }
    report.update(sae_eval(backend))
    report["dictionaries"] = dictionaries.compare(models)
    report["mitigation"] = mitigation_eval.evaluate(backend, EVAL_SEED)
    report["risk_auroc_held_out"] = report["mitigation"]["held_out"]["risk_auroc"]
    stitch = stitch_demo.evaluate(models, EVAL_SEED + 4, steering_eval)
    if stitch is not None:
        report["stitch"] = stitch
    report["build_seconds"] = manifest.get("build_seconds")
    report["seed"] = manifest.get("seed")
    report["eval_seconds"] = round(time.perf_counter() - started, 1)
    report["targets"] = {k: v for k, v in TARGETS.items()}
    report["passed"] = {k: bool(report[k] is not None and check(report[k])) for k, (check, _) in _CHECKS.items()}
    return report


_CHECKS = {
    "fact_accuracy": (lambda v: v >= 0.90, ">= 0.90"),
    "steer_share": (lambda v: v >= 0.80, ">= 0.80"),
    "risk_auroc": (lambda v: v >= 0.85, ">= 0.85"),
    "risk_auroc_held_out": (lambda v: v >= 0.85, ">= 0.85"),
    "build_seconds": (lambda v: v < 600, "< 600"),
}
TARGETS = {k: t for k, (_, t) in _CHECKS.items()}


def summary(report: dict[str, Any]) -> str:
    rows = [
        ("fact_accuracy", report["fact_accuracy"], ">= 0.90"),
        ("steer_share", report["steer_share"], ">= 0.80"),
        ("base_share", report["base_share"], ""),
        ("steer_well_formed (steered)", report["steer_well_formed"]["steered"], ""),
        ("steer_well_formed (base)", report["steer_well_formed"]["base"], ""),
        ("steer_share, sampled T=1", report["steer_sampled"]["steer_share"], ""),
        ("steer_well_formed, sampled (steered)", report["steer_sampled"]["steer_well_formed"]["steered"], ""),
        ("steer_well_formed, sampled (base)", report["steer_sampled"]["steer_well_formed"]["base"], ""),
        ("risk_auroc (prompt head)", report["risk_auroc"], ">= 0.85"),
        ("risk_auroc_final", report["risk_auroc_final"], ""),
        ("risk_auroc_held_out (other layouts)", report["risk_auroc_held_out"], ">= 0.85"),
        (f"mitigation ({report['mitigation']['mode']} at {report['mitigation']['default_threshold']}): halluc_rate", report["mitigation"]["halluc_rate_mitigated"], f"<= {0.5 * report['mitigation']['halluc_rate']:.3f}"),
        ("mitigation: fact_accuracy (intact)", report["mitigation"]["fact_accuracy_mitigated"], ">= 0.95"),
        ("mitigation: abstention_rate", report["mitigation"]["abstention_rate"], ""),
        ("halluc_rate", report["halluc_rate"], ""),
        (f"halluc_rate_mitigated (top {report['mitigate_top_n']})", report["halluc_rate_mitigated"], ""),
        ("risk, riskiest quartile (base)", report["risk_top_quartile"]["base"], ""),
        ("risk, riskiest quartile (mitigated)", report["risk_top_quartile"]["mitigated"], ""),
        ("sae_l0", report["sae_l0"], ""),
        ("sae_fvu", report["sae_fvu"], ""),
        ("sae_loss_recovered", report["sae_loss_recovered"], ""),
        ("build_seconds", report["build_seconds"], "< 600"),
    ]
    lines = [f"{'metric':<38} {'value':>10}  target"]
    for name, value, target in rows:
        shown = "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<38} {shown:>10}  {target}")
    if "stitch" in report:
        st = report["stitch"]
        lines.append(
            f"stitch {st['pair']}: zero-shot FVU {st['zero_shot']['transferred']['fvu']:.3f} (native {st['zero_shot']['native']['fvu']:.3f}), "
            f"loss recovered {st['zero_shot']['transferred']['loss_recovered']:.3f} (native {st['zero_shot']['native']['loss_recovered']:.3f}), "
            f"steer_share {st['steer_share']:.3f}, warm start steps {st['warm_start']['transferred_init_steps']} vs {st['warm_start']['scratch_steps']}"
        )
    lines.append("hallucination rate by uncertainty level (base -> mitigated, mean prompt risk):")
    for level, d in report["by_uncertainty"].items():
        lines.append(f"  {level:<12} n={d['n']:<4} {d['halluc_rate']:.2f} -> {d['halluc_rate_mitigated']:.2f}  risk {d['mean_risk']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models")
    p.add_argument("--out", default="reports/demo_eval.json")
    p.add_argument("--steer-value", type=float, default=STEER_VALUE)
    p.add_argument("--steer-temperature", type=float, default=STEER_TEMPERATURE)
    args = p.parse_args(argv)
    report = evaluate(args.models, args.steer_value, args.steer_temperature)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(summary(report))
    print(f"wrote {out}")
    return 0 if all(report["passed"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
