"""Per-request hallucination mitigation: pure decisions the text engine applies to one row.

A request may carry ``mitigation: {mode, threshold, params}`` (:class:`MitigationSpec`). After a
row's prefill the engine knows its prompt-time risk (the probe's prompt head on the row's pooled
after-edit prompt latents: the ``risk_prompt`` it reports) and asks :func:`decide` what to do.
Everything here is a pure function of its arguments; nothing reads or changes other rows.

Modes (``threshold`` is a probability in [0, 1]; a row is *gated* when ``risk >= threshold``):

- ``none``           never acts.
- ``abstain``        a gated row answers the abstention text instead of generating (the concept
                     world's ``unknown .``, which its checker never counts as a hallucination).
                     ``params``: ``text`` overrides the text (default: the probe's
                     ``meta["abstain_text"]``, else ``"unknown ."``).
- ``steer_unknown``  a gated row is steered towards the abstention answer: the latents that carry
                     it (the probe's ``meta["unknown_latents"]``: sae, latents, values measured
                     where the LM answers ``unknown``) are clamped (``set``) to ``scale`` x those
                     values. ``params``: ``scale`` (default 1.0).
- ``suppress``       a gated row has the probe's ``top_n`` most risk-positive latents ablated
                     (From Noise to Narrative's suppression of the concepts that fire with input
                     uncertainty). ``params``: ``top_n`` (default 10).

Engine contract (per row, in any batch; other rows are never affected):

1. Validation (once per request): ``spec = MitigationSpec.parse(mode, threshold, params)`` and
   ``check(spec, resources)``, where ``resources = MitigationResources.from_probe(probe)`` is
   built once per model. Both raise InvalidArgument naming ``mitigation.<field>``.
2. After the row's prefill: ``decision = decide(spec, risk_prompt, resources)`` with
   ``risk_prompt`` the probability the row reports as ``risk_prompt``.
3. Apply ``decision.action``:
   - ``PASS``: nothing; decode as usual.
   - ``ABSTAIN``: do not decode the row. Its completion text is ``decision.text`` (tokens: the
     tokenizer's ids of that text without special tokens), finish_reason ``"stop"``; its
     ``risk_prompt`` is the one computed, its ``risk_final`` is scored with empty generated pools.
     The row leaves the decode batch (it costs nothing more).
   - ``STEER``: the row's plan becomes ``mitigated_plan(plan, decision)`` (the decision's edits
     appended under the plan's own scope, as ``mitigate_risk_top_n`` does). The first new token
     was sampled from prefill logits computed without those edits, so the engine re-runs this
     row's prefill with the new plan (discarding its cache) and decodes from there: one extra
     prefill for a gated row, none for the others.
   ``decision.risk`` echoes the risk used and ``decision.gated`` whether the threshold was met,
   for the response and the metrics.

Emulation (until the engine calls this): encode the prompt through the backend for its prompt
risk, then ``generate`` with ``mitigated_plan`` or take ``decision.text``
(:func:`sae_runtime.demo.mitigation_eval.run_mitigated`); for an empty request plan this is
exactly the contract above.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit

MODES: tuple[str, ...] = ("none", "abstain", "steer_unknown", "suppress")
DEFAULT_ABSTAIN_TEXT = "unknown ."
_PARAMS: dict[str, dict[str, type]] = {"none": {}, "abstain": {"text": str}, "steer_unknown": {"scale": float}, "suppress": {"top_n": int}}


class Action(str, enum.Enum):
    PASS = "pass"
    ABSTAIN = "abstain"
    STEER = "steer"


@dataclass(frozen=True)
class MitigationSpec:
    """A request's mitigation: ``mode`` (one of MODES), ``threshold`` in [0, 1], ``params`` as
    (name, value) pairs (sorted; see the module doc for each mode's names)."""

    mode: str = "none"
    threshold: float = 0.5
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, mode: str, threshold: float = 0.5, params: Mapping[str, Any] | None = None) -> "MitigationSpec":
        """Validate and build; InvalidArgument names ``mitigation.mode`` / ``.threshold`` / ``.params.<name>``."""
        if mode not in MODES:
            raise InvalidArgument(f"unknown mitigation mode {mode!r} (use {MODES})", field="mitigation.mode")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise InvalidArgument(f"threshold must be a probability in [0, 1], got {threshold!r}", field="mitigation.threshold")
        allowed = _PARAMS[mode]
        checked = []
        for name, value in sorted((params or {}).items()):
            if name not in allowed:
                raise InvalidArgument(f"mode {mode!r} takes no parameter {name!r} (takes {sorted(allowed)})", field=f"mitigation.params.{name}")
            kind = allowed[name]
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise InvalidArgument("must be a finite number", field=f"mitigation.params.{name}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgument("must be an integer >= 1", field=f"mitigation.params.{name}")
            if kind is str and (not isinstance(value, str) or not value.strip()):
                raise InvalidArgument("must be a non-empty string", field=f"mitigation.params.{name}")
            checked.append((name, kind(value)))
        return cls(mode, float(threshold), tuple(checked))

    def param(self, name: str, default: Any) -> Any:
        return dict(self.params).get(name, default)


@dataclass(frozen=True)
class MitigationResources:
    """What a model offers the modes, built once from its risk probe (None: no probe)."""

    has_probe: bool = False
    abstain_text: str = DEFAULT_ABSTAIN_TEXT
    #: (sae, latent, value) of the latents that carry the abstention answer.
    unknown_latents: tuple[tuple[str, int, float], ...] = ()
    #: (sae, latent) most risk-positive first (the probe's final head).
    risk_latents: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_probe(cls, probe: Any | None, max_risk_latents: int = 64) -> "MitigationResources":
        if probe is None:
            return cls()
        meta = probe.meta or {}
        unknown = meta.get("unknown_latents") or {}
        triples = tuple((str(unknown["sae"]), int(i), float(v)) for i, v in zip(unknown.get("latents", ()), unknown.get("values", ()))) if unknown else ()
        return cls(True, str(meta.get("abstain_text") or DEFAULT_ABSTAIN_TEXT), triples, tuple(probe.top_risk_latents(max_risk_latents)))


@dataclass(frozen=True)
class MitigationDecision:
    action: Action
    risk: float
    gated: bool
    text: str | None = None  # ABSTAIN: the row's whole completion
    edits: tuple[LatentEdit, ...] = field(default=())  # STEER: appended to the row's plan


def check(spec: MitigationSpec, resources: MitigationResources) -> None:
    """InvalidArgument (field ``mitigation.mode``) when the model cannot serve ``spec``."""
    if spec.mode == "none":
        return
    if not resources.has_probe:
        raise InvalidArgument(f"mode {spec.mode!r} needs a risk probe; this model has none", field="mitigation.mode")
    if spec.mode == "steer_unknown" and not resources.unknown_latents:
        raise InvalidArgument("the risk probe records no unknown_latents for steer_unknown", field="mitigation.mode")
    if spec.mode == "suppress" and spec.param("top_n", 10) > len(resources.risk_latents):
        raise InvalidArgument(f"the probe has only {len(resources.risk_latents)} risk-positive latents", field="mitigation.params.top_n")


def decide(spec: MitigationSpec, risk: float | None, resources: MitigationResources) -> MitigationDecision:
    """What to do with one row whose prompt-time risk is ``risk`` (None: the model has no probe)."""
    r = float("nan") if risk is None else float(risk)
    gated = spec.mode != "none" and risk is not None and r >= spec.threshold
    if not gated:
        return MitigationDecision(Action.PASS, r, False)
    if spec.mode == "abstain":
        return MitigationDecision(Action.ABSTAIN, r, True, text=spec.param("text", resources.abstain_text))
    if spec.mode == "steer_unknown":
        scale = spec.param("scale", 1.0)
        edits = tuple(LatentEdit(sae=s, op=EditOp.SET, latents=(i,), value=v * scale) for s, i, v in resources.unknown_latents)
        return MitigationDecision(Action.STEER, r, True, edits=edits)
    by_sae: dict[str, list[int]] = {}
    for s, i in resources.risk_latents[: spec.param("top_n", 10)]:
        by_sae.setdefault(s, []).append(i)
    return MitigationDecision(Action.STEER, r, True, edits=tuple(LatentEdit(sae=s, op=EditOp.ABLATE, latents=tuple(v)) for s, v in by_sae.items()))


def mitigated_plan(plan: InterventionPlan, decision: MitigationDecision) -> InterventionPlan:
    """The row's plan with a STEER decision's edits appended (same scope); unchanged otherwise."""
    if decision.action is not Action.STEER or not decision.edits:
        return plan
    return replace(plan, edits=plan.edits + decision.edits)


__all__ = ["Action", "DEFAULT_ABSTAIN_TEXT", "MODES", "MitigationDecision", "MitigationResources", "MitigationSpec", "check", "decide", "mitigated_plan"]
