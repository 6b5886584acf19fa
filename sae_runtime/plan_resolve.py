"""Validation of an :class:`~sae_runtime.plan.InterventionPlan` against a model's SAEs, steering
vectors, presets and label search: the body of :meth:`InterventionPlan.resolve` (see its docstring
for what the resolved plan holds). Errors name the request field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument, NotFound, SaeRuntimeError, TooLarge, require_finite
from sae_runtime.plan import (
    MAX_CONDITION_DEPTH, VECTOR_OPS, CfgHalf, Compare, Condition, EditOp, InterventionPlan, LatentEdit, Scope,
    TokenScope, VectorEdit, VisionScope,
)
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.vectors import SteeringVector, resolve_direction


def resolve_plan(
    plan: InterventionPlan, saes: Mapping[str, Sae], *, max_edits: int = 4096, field_prefix: str = "plan",
    vectors: Mapping[str, SteeringVector] = {}, presets: Mapping[str, InterventionPlan] = {},
    describe: Callable[[str, str, int], Sequence[int]] | None = None,
    site_width: Callable[[HookSite], int] | None = None,
    sae_sites: Mapping[str, HookSite] = {},
    max_inline_vector_dims: int = 16384,
) -> InterventionPlan:
    """``plan`` validated and resolved (:meth:`InterventionPlan.resolve`)."""
    p = field_prefix
    edits: list[tuple[LatentEdit, str]] = []
    vecs: list[tuple[VectorEdit, str]] = []
    for n, name in enumerate(plan.presets):
        if name not in presets:
            raise NotFound(f"unknown preset {name!r} (available: {', '.join(sorted(presets)) or 'none'})",
                           field=f"{p}.presets[{n}]")
        pre = presets[name]
        edits += [(e, f"{p}.presets[{n}].edits[{i}]") for i, e in enumerate(pre.edits)]
        vecs += [(v, f"{p}.presets[{n}].vectors[{i}]") for i, v in enumerate(pre.vectors)]
    edits += [(e, f"{p}.edits[{i}]") for i, e in enumerate(plan.edits)]
    vecs += [(v, f"{p}.vectors[{i}]") for i, v in enumerate(plan.vectors)]
    total = sum(len(e.latents) + len(e.labels) + (e.top_n if e.describe and isinstance(e.top_n, int) else 0)
                for e, _ in edits) + len(vecs)
    if total > max_edits:
        raise TooLarge(f"{total} latent and vector edits exceed the limit of {max_edits}", field=f"{p}.edits")
    inline = sum(len(v.values) for v, _ in vecs)
    if inline > max_inline_vector_dims:
        raise TooLarge(f"{inline} inline vector values exceed the limit of {max_inline_vector_dims}",
                       field=f"{p}.vectors")
    checker = _Conditions(saes, sae_sites)
    resolved = [_resolve_edit(e, f, saes, describe, checker) for e, f in edits]
    resolved_vecs = []
    for v, f in vecs:
        hook, direction = resolve_direction(v.vector, v.values, v.site, f, vectors=vectors, site_width=site_width,
                                            resolved=v.direction)
        try:
            op = EditOp(v.op)
        except ValueError:
            raise InvalidArgument(f"unknown op {v.op!r}", field=f"{f}.op") from None
        if op not in VECTOR_OPS:
            raise InvalidArgument(f"a steering vector takes {', '.join(sorted(o.value for o in VECTOR_OPS))}, "
                                  f"not {op.value}", field=f"{f}.op")
        if v.normalize and op is not EditOp.ADD:
            raise InvalidArgument("normalize applies to op 'add' only", field=f"{f}.normalize")
        cond = None if v.condition is None else checker.check(v.condition, f"{f}.condition", hook)
        resolved_vecs.append(replace(v, op=op, value=require_finite(v.value, f"{f}.value"), site=hook.name,
                                     values=(), condition=cond, direction=direction))
    stop = None
    if plan.stop_when is not None:
        stop = checker.check(plan.stop_when, f"{p}.stop_when", None, stop=True)
    return replace(plan, edits=tuple(resolved), vectors=tuple(resolved_vecs), stop_when=stop, presets=(),
                   scope=check_scope(plan.scope, f"{p}.scope"))


def _resolve_edit(e: LatentEdit, f: str, saes: Mapping[str, Sae],
                  describe: Callable[[str, str, int], Sequence[int]] | None, checker: "_Conditions") -> LatentEdit:
    if e.sae not in saes:
        raise NotFound(f"unknown SAE {e.sae!r} (available: {', '.join(sorted(saes)) or 'none'})", field=f"{f}.sae")
    sae = saes[e.sae]
    try:
        op = EditOp(e.op)
    except ValueError:
        raise InvalidArgument(f"unknown op {e.op!r}", field=f"{f}.op") from None
    latents = list(e.latents)
    sae.check_latents(latents, field=f"{f}.latents")
    for label in e.labels:
        if label not in sae.labels:
            raise NotFound(f"SAE {e.sae!r} has no latent labelled {label!r}", field=f"{f}.labels")
        latents.append(sae.labels[label])
    if e.describe:
        if not isinstance(e.top_n, int) or isinstance(e.top_n, bool) or not 1 <= e.top_n <= 64:
            raise InvalidArgument(f"top_n must be an integer in [1, 64], got {e.top_n!r}", field=f"{f}.top_n")
        if describe is None:
            raise InvalidArgument("this model cannot resolve descriptions to latents", field=f"{f}.describe")
        try:
            found = [int(i) for i in describe(e.sae, e.describe, e.top_n)]
        except SaeRuntimeError as err:  # the describer names its own argument: put the edit's path in front
            raise type(err)(err.message, field=f"{f}.{err.field or 'describe'}") from None
        sae.check_latents(found, field=f"{f}.describe")
        latents += found
    if not latents:
        raise InvalidArgument("names no latent (give latents, labels or describe)", field=f"{f}.latents")
    value = require_finite(e.value, f"{f}.value")
    if e.normalize and op is not EditOp.ADD:
        raise InvalidArgument("normalize applies to op 'add' only", field=f"{f}.normalize")
    cond = None if e.condition is None else checker.check(e.condition, f"{f}.condition", checker.site_of(e.sae))
    return replace(e, op=op, latents=tuple(dict.fromkeys(latents)), value=value, labels=(), describe="", condition=cond)


class _Conditions:
    """Validates condition trees against the SAEs (and, when known, their sites)."""

    def __init__(self, saes: Mapping[str, Sae], sae_sites: Mapping[str, HookSite]) -> None:
        self.saes, self.sites = saes, sae_sites

    def site_of(self, sae: str) -> HookSite | None:
        return self.sites.get(sae)

    def check(self, c: Condition, field: str, edited: HookSite | None, *, stop: bool = False) -> Condition:
        """The tree with labels resolved. ``edited``: the edited site (None: unknown, or a stop_when:
        ``stop``, whose leaves must sit at text sites)."""
        if condition_depth(c, MAX_CONDITION_DEPTH + 1) > MAX_CONDITION_DEPTH:
            raise InvalidArgument(f"condition tree deeper than {MAX_CONDITION_DEPTH}", field=field)
        return self._check(c, field, edited, stop)

    def _check(self, c: Condition, field: str, edited: HookSite | None, stop: bool) -> Condition:
        if not isinstance(c, Condition):
            raise InvalidArgument(f"expected a Condition, got {type(c).__name__}", field=field)
        if c.all_of or c.any_of:
            if c.all_of and c.any_of:
                raise InvalidArgument("a node has exactly one of all_of / any_of", field=f"{field}.any_of")
            if c.sae or c.latent is not None or c.label:
                raise InvalidArgument("a node (all_of / any_of) sets no sae, latent or label", field=f"{field}.sae")
            key = "all_of" if c.all_of else "any_of"
            kids = tuple(self._check(k, f"{field}.{key}[{i}]", edited, stop) for i, k in enumerate(getattr(c, key)))
            return replace(c, **{key: kids})
        if c.sae not in self.saes:
            raise NotFound(f"unknown SAE {c.sae!r} (available: {', '.join(sorted(self.saes)) or 'none'})",
                           field=f"{field}.sae")
        sae = self.saes[c.sae]
        if (c.latent is None) == (not c.label):
            raise InvalidArgument("a leaf names exactly one of latent or label", field=f"{field}.latent")
        latent = c.latent
        if c.label:
            if c.label not in sae.labels:
                raise NotFound(f"SAE {c.sae!r} has no latent labelled {c.label!r}", field=f"{field}.label")
            latent = sae.labels[c.label]
        sae.check_latents([latent], field=f"{field}.latent")
        try:
            compare = Compare(c.compare)
        except ValueError:
            raise InvalidArgument(f"unknown compare {c.compare!r}", field=f"{field}.compare") from None
        threshold = require_finite(c.threshold, f"{field}.threshold")
        site = self.sites.get(c.sae)
        if site is not None and stop and not site.is_text:
            raise InvalidArgument(f"stop_when reads generated tokens; SAE {c.sae!r} sits at {site.name}",
                                  field=f"{field}.sae")
        if site is not None and edited is not None and not edited.readable_from(site):
            raise InvalidArgument(f"SAE {c.sae!r} at {site.name} is not computed before {edited.name} in the same "
                                  "forward (a condition reads the edited site or an earlier one)", field=f"{field}.sae")
        return replace(c, latent=int(latent), label="", compare=compare, threshold=threshold)


def condition_depth(c: Condition, limit: int = 1 << 30) -> int:
    """Depth of a condition tree (a leaf alone is 1), counted no further than ``limit``."""
    kids = getattr(c, "all_of", ()) + getattr(c, "any_of", ())
    if not kids or limit <= 1:
        return 1
    return 1 + max(condition_depth(k, limit - 1) for k in kids)


def check_scope(scope: Scope, field: str) -> Scope:
    try:
        scope = replace(
            scope,
            tokens=TokenScope(scope.tokens),
            vision=VisionScope(scope.vision),
            cfg_half=CfgHalf(scope.cfg_half),
        )
    except ValueError as err:
        raise InvalidArgument(str(err), field=field) from None
    if scope.step_start < 0:
        raise InvalidArgument("step_start must be >= 0", field=f"{field}.step_start")
    if scope.step_end is not None and scope.step_end <= scope.step_start:
        raise InvalidArgument("step_end must be greater than step_start", field=f"{field}.step_end")
    if scope.mask is not None:
        m = scope.mask
        if not isinstance(m, Tensor) or m.dim() != 2 or m.numel() == 0:
            raise InvalidArgument("mask must be a non-empty 2-D (H, W) tensor", field=f"{field}.mask")
        if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise InvalidArgument("mask values must be finite and in [0, 1]", field=f"{field}.mask")
    return scope

