"""Evaluate the hallucination mitigations of :mod:`sae_runtime.mitigation` on the demo LM, through
the public backend API, and the risk probe on held-out context layouts.

Two-pass emulation of the engine contract (see sae_runtime.mitigation): ``backend.encode`` gives
each prompt's prompt-time risk; :func:`mitigation.decide` gates it; a gated row takes the
abstention text, or is generated again with :func:`mitigation.mitigated_plan`. With greedy
decoding an ungated row's answer is the plain answer, so one plain and one steered generation
per mode give the answer at every threshold.

- ``curve``: per threshold, on fact prompts of every uncertainty level (the eval's mix), the
  hallucination rate and abstention rate, and on intact items the fact accuracy, with ``abstain``.
- the default threshold is chosen on a separate calibration set (its own seed): the highest
  threshold (fewest abstentions) that brings the hallucination rate to 0.8 x half the plain rate
  (a margin for sampling error) with intact accuracy >= 0.95; the report gives its figures on
  the eval set, for each mode.
- ``held_out``: the same on the layouts of :mod:`.layouts` (one sentence, 5-7 sentences, asked
  fact first / last), with the probe's AUROC per layout.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from sae_runtime.backends.types import EncodeRequest, SamplingParams, TextRequest
from sae_runtime.demo import world
from sae_runtime.demo.build import first_sentence_completion
from sae_runtime.mitigation import Action, MitigationResources, MitigationSpec, check, decide, mitigated_plan
from sae_runtime.plan import InterventionPlan

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
MIN_ACCURACY = 0.95
GREEDY = SamplingParams(max_new_tokens=2, temperature=0.0)


def prompt_risks(backend: Any, prompts: Sequence[str]) -> list[float]:
    """Pass 1: each prompt's prompt-head risk from ``backend.encode`` (no generation)."""
    return [backend.encode(EncodeRequest(text=p, saes=(), top_k=1)).risk.probability for p in prompts]


def generate(backend: Any, prompts: Sequence[str], plans: Sequence[InterventionPlan], batch: int = 64) -> list[str]:
    out: list[str] = []
    for s in range(0, len(prompts), batch):
        reqs = [backend.validate(TextRequest(prompt=p, plan=pl, sampling=GREEDY)) for p, pl in zip(prompts[s : s + batch], plans[s : s + batch])]
        out += [first_sentence_completion(r.steered.text) for r in backend.generate(reqs)]
    return out


def run_mitigated(backend: Any, prompts: Sequence[str], spec: MitigationSpec, resources: MitigationResources, risks: Sequence[float] | None = None) -> tuple[list[str], list[bool]]:
    """(answers, gated) of the prompts under ``spec``, by the two-pass emulation."""
    check(spec, resources)
    risks = prompt_risks(backend, prompts) if risks is None else risks
    decisions = [decide(spec, r, resources) for r in risks]
    steer = [i for i, d in enumerate(decisions) if d.action is not Action.ABSTAIN]
    generated = generate(backend, [prompts[i] for i in steer], [mitigated_plan(InterventionPlan(), decisions[i]) for i in steer])
    answers: list[str] = [d.text or "" for d in decisions]
    for i, a in zip(steer, generated):
        answers[i] = a
    return answers, [d.gated for d in decisions]


class _Set:
    """Items, their prompt risks, plain answers and (per mode) fully mitigated answers."""

    def __init__(self, backend: Any, items: Sequence[world.FactItem], resources: MitigationResources, modes: Sequence[MitigationSpec]) -> None:
        self.items = list(items)
        prompts = [it.prompt for it in self.items]
        self.risk = prompt_risks(backend, prompts)
        self.plain = generate(backend, prompts, [InterventionPlan()] * len(prompts))
        # threshold 0 gates every row: the answer each row gets when gated
        self.gated_answer = {m.mode: run_mitigated(backend, prompts, MitigationSpec(m.mode, 0.0, m.params), resources, self.risk)[0] for m in modes}

    def answers(self, mode: str, threshold: float) -> list[str]:
        return [g if r >= threshold else p for r, p, g in zip(self.risk, self.plain, self.gated_answer[mode])]

    def halluc_rate(self, answers: Sequence[str]) -> float:
        return sum(world.is_hallucinated(it, a) for it, a in zip(self.items, answers)) / max(len(self.items), 1)

    def accuracy(self, answers: Sequence[str]) -> float:
        return sum(world.is_correct(it, a) for it, a in zip(self.items, answers)) / max(len(self.items), 1)

    def gated_rate(self, threshold: float) -> float:
        return sum(r >= threshold for r in self.risk) / max(len(self.risk), 1)


def _point(mixed: _Set, intact: _Set, mode: str, t: float) -> dict[str, float]:
    return {
        "threshold": t,
        "halluc_rate": mixed.halluc_rate(mixed.answers(mode, t)),
        "fact_accuracy": intact.accuracy(intact.answers(mode, t)),
        "abstention_rate": mixed.gated_rate(t),
        "intact_abstention_rate": intact.gated_rate(t),
    }


def pick_threshold(points: Sequence[Mapping[str, float]], plain_halluc: float, margin: float = 0.8) -> float:
    """From curve points (``threshold``, ``halluc_rate``, ``fact_accuracy``): the highest threshold
    (fewest abstentions) whose hallucination rate is at most ``margin`` x half ``plain_halluc`` with
    intact accuracy >= MIN_ACCURACY; if none, the lowest hallucination rate with that accuracy
    (1.0 when no threshold keeps the accuracy)."""
    ok = [p for p in points if p["fact_accuracy"] >= MIN_ACCURACY]
    if not ok:
        return 1.0
    meeting = [p for p in ok if p["halluc_rate"] <= margin * 0.5 * plain_halluc]
    if meeting:
        return max(p["threshold"] for p in meeting)
    return min(ok, key=lambda p: (p["halluc_rate"], -p["threshold"]))["threshold"]


def choose_threshold(mixed: _Set, intact: _Set, mode: str, margin: float = 0.8) -> float:
    """:func:`pick_threshold` over THRESHOLDS for ``mode`` on a calibration set."""
    return pick_threshold([_point(mixed, intact, mode, t) for t in THRESHOLDS], mixed.halluc_rate(mixed.plain), margin)

def evaluate(
    backend: Any, seed: int, n_mixed: int = 600, n_intact: int = 300, n_calibration: int = 240, n_held_out: int = 1200,
    modes: Sequence[str] = ("abstain", "steer_unknown", "suppress"),
) -> dict[str, Any]:
    """The ``mitigation`` report (see the module doc); ``seed`` must be disjoint from the build's.
    ``modes`` must start with the default mode (``abstain``); ``steer_unknown`` is skipped when
    the probe records no unknown latents."""
    from sae_runtime.demo.layouts import HELD_OUT_LAYOUTS, layout_items
    from sae_runtime.risk import auroc

    resources = MitigationResources.from_probe(backend.risk_probe)
    specs = {"abstain": MitigationSpec.parse("abstain"), "steer_unknown": MitigationSpec.parse("steer_unknown"), "suppress": MitigationSpec.parse("suppress", params={"top_n": 10})}
    modes = [specs[m] for m in modes if m != "steer_unknown" or resources.unknown_latents]
    cal_mixed = _Set(backend, world.fact_items(n_calibration, seed + 5), resources, modes)
    cal_intact = _Set(backend, world.fact_items(n_calibration // 2, seed + 6, mix=[("intact", 0.0)]), resources, modes)
    mixed = _Set(backend, world.fact_items(n_mixed, seed + 3), resources, modes)
    intact = _Set(backend, world.fact_items(n_intact, seed + 2, mix=[("intact", 0.0)]), resources, modes)
    pairs = layout_items(n_held_out, seed + 7, HELD_OUT_LAYOUTS)
    held = _Set(backend, [it for _, it in pairs], resources, modes)
    held_intact_idx = [i for i, (_, it) in enumerate(pairs) if it.variant == "intact"]

    per_mode: dict[str, Any] = {}
    for m in modes:
        t = choose_threshold(cal_mixed, cal_intact, m.mode)
        held_answers = held.answers(m.mode, t)
        per_mode[m.mode] = _point(mixed, intact, m.mode, t) | {
            "held_out": {
                "halluc_rate": held.halluc_rate(held_answers),
                "fact_accuracy_intact": sum(world.is_correct(pairs[i][1], held_answers[i]) for i in held_intact_idx) / max(len(held_intact_idx), 1),
                "abstention_rate": held.gated_rate(t),
            }
        }
    default = "abstain"
    d = per_mode[default]
    base_halluc, base_acc = mixed.halluc_rate(mixed.plain), intact.accuracy(intact.plain)
    labels = torch.tensor([int(world.is_hallucinated(it, a)) for it, a in zip(held.items, held.plain)])
    risks = torch.tensor(held.risk)
    by_layout = {}
    for layout in HELD_OUT_LAYOUTS:
        m = torch.tensor([lay == layout for lay, _ in pairs])
        y = labels[m]
        by_layout[layout] = {
            "n": int(m.sum()),
            "risk_auroc": auroc(risks[m], y) if 0 < int(y.sum()) < y.numel() else None,
            "halluc_rate": float(y.float().mean()),
            "halluc_rate_mitigated": sum(world.is_hallucinated(it, a) for (lay, it), a in zip(pairs, held.answers(default, d["threshold"])) if lay == layout) / int(m.sum()),
        }
    return {
        "mode": default,
        "default_threshold": d["threshold"],
        "halluc_rate": base_halluc,
        "halluc_rate_mitigated": d["halluc_rate"],
        "fact_accuracy": base_acc,
        "fact_accuracy_mitigated": d["fact_accuracy"],
        "abstention_rate": d["abstention_rate"],
        "target_met": d["halluc_rate"] <= 0.5 * base_halluc and d["fact_accuracy"] >= MIN_ACCURACY,
        "curve": [_point(mixed, intact, default, t) for t in THRESHOLDS],
        "modes": per_mode,
        "held_out": {
            "risk_auroc": auroc(risks, labels),
            "halluc_rate": float(labels.float().mean()),
            "halluc_rate_mitigated": held.halluc_rate(held.answers(default, d["threshold"])),
            "by_layout": by_layout,
            "n_items": len(pairs),
        },
        "n_items": {"mixed": len(mixed.items), "intact": len(intact.items), "calibration": len(cal_mixed.items) + len(cal_intact.items), "held_out": len(pairs)},
    }


__all__ = ["THRESHOLDS", "choose_threshold", "pick_threshold", "evaluate", "generate", "prompt_risks", "run_mitigated"]
