"""Risk-gated abstention for the shapes world's LLaVA: a risk-coverage curve and a chosen default.

    python -m sae_runtime.demo.shapes_mitigation --models models [--out reports/demo_eval.json]

The question is "what colour is the shape ?" about images whose pixels are partly replaced with
uniform noise (levels 0..1, the build's probe levels). A *hallucination* is an answer that names a
colour other than the shape's (an answer naming no colour, such as the abstention ``unknown .``,
never is); *intact accuracy* is the share of clean images (noise 0) answered with their colour.

Mode ``abstain`` (:mod:`sae_runtime.mitigation`): a request whose prompt-time risk (the LLaVA
probe on pooled vision and language latents, ``risk_prompt``) is at least the threshold answers
the abstention text instead of generating. So at threshold t a row's answer is its unmitigated
answer if its risk < t, else the abstention; the curve is read off one unmitigated pass (answer
and ``risk_prompt`` per image). The threshold is chosen on a calibration set (the highest whose
hallucination rate is at most 0.8 x half the unmitigated rate with intact accuracy >= 0.95) and
reported on separate images; the chosen default is then run through the engine itself
(``TextRequest.mitigation``) and its answers compared with the curve's (``engine_agrees``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sae_runtime.backends.llava import LlavaBackend
from sae_runtime.demo import shapes_world as sw
from sae_runtime.demo.shapes_build import PROBE_NOISE
from sae_runtime.demo.mitigation_eval import MIN_ACCURACY, pick_threshold
from sae_runtime.demo.shapes_clamps import answers
from sae_runtime.demo.shapes_eval import EVAL_SEED, llava_backend
from sae_runtime.mitigation import MitigationResources, MitigationSpec

THRESHOLDS = tuple(np.round(np.linspace(0.05, 1.0, 20), 2).tolist())


def first_colour(text: str) -> str | None:
    """The first colour word of an answer, or None."""
    return next((w for w in text.split() if w in sw.COLOURS), None)


@dataclass(frozen=True)
class Answered:
    """Unmitigated greedy answers to the colour question and their prompt-time risks."""

    scenes: tuple[sw.Scene, ...]
    texts: tuple[str, ...]
    risks: tuple[float, ...]

    @classmethod
    def run(cls, backend: LlavaBackend, scenes: Sequence[sw.Scene]) -> "Answered":
        res = answers(backend, scenes, "colour")
        return cls(tuple(scenes), tuple(r.steered.text for r in res), tuple(r.risk_prompt.probability for r in res))

    def at(self, threshold: float, abstain_text: str) -> list[str]:
        """Each image's answer under abstention gated at ``threshold`` (risk >= threshold abstains)."""
        return [abstain_text if r >= threshold else t for t, r in zip(self.texts, self.risks)]

    def halluc_rate(self, texts: Sequence[str]) -> float:
        said = [first_colour(t) for t in texts]
        return float(np.mean([c is not None and c != s.colour for c, s in zip(said, self.scenes)]))

    def accuracy(self, texts: Sequence[str]) -> float:
        return float(np.mean([first_colour(t) == s.colour for t, s in zip(texts, self.scenes)]))

    def gated(self, threshold: float) -> float:
        return float(np.mean([r >= threshold for r in self.risks]))


def point(mixed: Answered, intact: Answered, t: float, text: str) -> dict[str, float]:
    return {"threshold": t, "halluc_rate": mixed.halluc_rate(mixed.at(t, text)),
            "fact_accuracy": intact.accuracy(intact.at(t, text)), "abstention_rate": mixed.gated(t),
            "intact_abstention_rate": intact.gated(t)}


def choose_threshold(mixed: Answered, intact: Answered, text: str, margin: float = 0.8) -> float:
    """:func:`~sae_runtime.demo.mitigation_eval.pick_threshold` over THRESHOLDS on a calibration set."""
    return pick_threshold([point(mixed, intact, t, text) for t in THRESHOLDS], mixed.halluc_rate(mixed.texts), margin)

def evaluate(models: str | Path, n_mixed: int = 330, n_intact: int = 120, n_calibration: int = 220, log=print) -> dict[str, Any]:
    """The ``mitigation_llava`` report: curve on held-out images, chosen default, engine check."""
    backend = llava_backend(models)
    text = MitigationResources.from_probe(backend.risk_probe).abstain_text
    seed = EVAL_SEED + 500
    cal_mixed = Answered.run(backend, sw.random_scenes(n_calibration, seed, noise_levels=PROBE_NOISE))
    cal_intact = Answered.run(backend, sw.random_scenes(n_calibration // 2, seed + 1))
    mixed = Answered.run(backend, sw.random_scenes(n_mixed, seed + 2, noise_levels=PROBE_NOISE))
    intact = Answered.run(backend, sw.random_scenes(n_intact, seed + 3))
    t = choose_threshold(cal_mixed, cal_intact, text)
    chosen = point(mixed, intact, t, text)
    spec = MitigationSpec.parse("abstain", t)
    through_engine = [r.steered.text for r in answers(backend, mixed.scenes, "colour", mitigation=spec)]
    agree = float(np.mean([a == b for a, b in zip(through_engine, mixed.at(t, text))]))
    report = {
        "question": "colour", "noise_levels": list(PROBE_NOISE), "mode": "abstain", "abstain_text": text,
        "threshold": t, "halluc_rate": mixed.halluc_rate(mixed.texts),
        "halluc_rate_mitigated": chosen["halluc_rate"], "fact_accuracy": intact.accuracy(intact.texts),
        "fact_accuracy_mitigated": chosen["fact_accuracy"], "abstention_rate": chosen["abstention_rate"],
        "engine_agrees": agree, "n_mixed": n_mixed, "n_intact": n_intact, "n_calibration": n_calibration,
        "curve": [point(mixed, intact, th, text) for th in THRESHOLDS],
        "targets": {"halluc_rate_mitigated": "<= 0.5 x halluc_rate", "fact_accuracy_mitigated": ">= 0.95"},
    }
    report["passed"] = bool(report["halluc_rate_mitigated"] <= 0.5 * report["halluc_rate"]
                            and report["fact_accuracy_mitigated"] >= MIN_ACCURACY)
    log(f"  llava abstain at {t:.2f}: hallucination {report['halluc_rate']:.3f} -> {report['halluc_rate_mitigated']:.3f}, "
        f"intact accuracy {report['fact_accuracy']:.3f} -> {report['fact_accuracy_mitigated']:.3f}, "
        f"abstentions {report['abstention_rate']:.2f}, engine agrees {agree:.3f}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.shapes_mitigation", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models")
    p.add_argument("--out", default="reports/demo_eval.json", help="JSON report; the key mitigation_llava is merged in")
    args = p.parse_args(argv)
    report = evaluate(args.models)
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged["mitigation_llava"] = report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
