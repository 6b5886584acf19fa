"""proto <-> sae_runtime for intervention plans: edits, conditions, steering vectors, presets.

Structural checks only (enums, which fields of a message go together, condition depth, top_n,
and, given the model's limits, the number of variants and of inline vector floats); names, indices
and widths are checked by ``InterventionPlan.resolve`` in the backend. Errors name the proto field
(``plan.edits[0].condition.any_of[1].latent``). No tensor math: a plan's mask becomes a tensor,
inline vectors stay tuples of floats.
"""

from __future__ import annotations

from typing import Sequence

import torch
from steering.v1 import steering_pb2 as pb

from sae_runtime.backends.spec import Limits
from sae_runtime.errors import InvalidArgument, TooLarge
from sae_runtime.plan import (
    MAX_CONDITION_DEPTH,
    CfgHalf,
    Compare,
    Condition,
    EditOp,
    InterventionPlan,
    LatentEdit,
    Scope,
    VECTOR_OPS,
    TokenScope,
    VectorEdit,
    VisionScope,
)

#: Most latents one ``describe`` may choose.
MAX_DESCRIBE_TOP_N = 64

OPS = {
    pb.EDIT_OP_SET: EditOp.SET,
    pb.EDIT_OP_ABLATE: EditOp.ABLATE,
    pb.EDIT_OP_SCALE: EditOp.SCALE,
    pb.EDIT_OP_ADD: EditOp.ADD,
    pb.EDIT_OP_CAP: EditOp.CAP,
    pb.EDIT_OP_PROJECT_SET: EditOp.PROJECT_SET,
    pb.EDIT_OP_PROJECT_CAP: EditOp.PROJECT_CAP,
}
COMPARES = {pb.COMPARE_ABOVE: Compare.ABOVE, pb.COMPARE_BELOW: Compare.BELOW}
TOKEN_SCOPES = {pb.TOKEN_SCOPE_ALL: TokenScope.ALL, pb.TOKEN_SCOPE_PROMPT: TokenScope.PROMPT, pb.TOKEN_SCOPE_GENERATED: TokenScope.GENERATED}
VISION_SCOPES = {pb.VISION_SCOPE_ALL: VisionScope.ALL, pb.VISION_SCOPE_CLS: VisionScope.CLS}
CFG_HALVES = {pb.CFG_HALF_BOTH: CfgHalf.BOTH, pb.CFG_HALF_COND: CfgHalf.COND, pb.CFG_HALF_UNCOND: CfgHalf.UNCOND}


def _inverse(table: dict) -> dict:
    return {v: k for k, v in table.items()}


_OPS_PB, _COMPARES_PB = _inverse(OPS), _inverse(COMPARES)
_TOKEN_SCOPES_PB, _VISION_SCOPES_PB, _CFG_HALVES_PB = _inverse(TOKEN_SCOPES), _inverse(VISION_SCOPES), _inverse(CFG_HALVES)


def enum_value(table: dict, value: int, field: str):
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown or unspecified value {value}", field=field) from None


# -- proto -> sae_runtime -----------------------------------------------------------------------


def mask_from_proto(msg: pb.Mask, field: str) -> torch.Tensor | None:
    if not msg.height and not msg.width and not msg.values:
        return None
    if msg.height * msg.width != len(msg.values) or msg.height == 0:
        raise InvalidArgument(f"needs height * width values ({msg.height} * {msg.width}), got {len(msg.values)}", field=field)
    return torch.tensor(list(msg.values), dtype=torch.float32).reshape(msg.height, msg.width)


def condition_from_proto(msg: pb.Condition, field: str, depth: int = 1) -> Condition:
    """A Condition tree. A node (all_of or any_of) carries no leaf field; a leaf names its SAE and
    exactly one of latent / label; the tree is at most MAX_CONDITION_DEPTH deep."""
    if depth > MAX_CONDITION_DEPTH:
        raise InvalidArgument(f"a condition is at most {MAX_CONDITION_DEPTH} levels deep", field=field)
    if msg.all_of or msg.any_of:
        if msg.all_of and msg.any_of:
            raise InvalidArgument("a node has all_of or any_of, not both", field=f"{field}.any_of")
        for name in ("sae", "latent", "label", "compare", "threshold"):
            if name == "latent" and not msg.HasField("latent"):
                continue
            if name != "latent" and not getattr(msg, name):
                continue
            raise InvalidArgument("a node (all_of / any_of) takes no leaf field", field=f"{field}.{name}")
        kind = "all_of" if msg.all_of else "any_of"
        children = tuple(condition_from_proto(c, f"{field}.{kind}[{n}]", depth + 1) for n, c in enumerate(getattr(msg, kind)))
        return Condition(all_of=children) if kind == "all_of" else Condition(any_of=children)
    if not msg.sae:
        raise InvalidArgument("a condition leaf names its SAE", field=f"{field}.sae")
    if msg.HasField("latent") == bool(msg.label):
        raise InvalidArgument("a condition leaf names exactly one of latent and label", field=f"{field}.latent")
    return Condition(
        sae=msg.sae,
        latent=int(msg.latent) if msg.HasField("latent") else None,
        label=msg.label,
        compare=enum_value(COMPARES, msg.compare, f"{field}.compare"),
        threshold=float(msg.threshold),
    )


def _edit_from_proto(e: pb.LatentEdit, f: str) -> LatentEdit:
    if not 0 <= e.top_n <= MAX_DESCRIBE_TOP_N:
        raise InvalidArgument(f"must be in [0, {MAX_DESCRIBE_TOP_N}] (0 = 1)", field=f"{f}.top_n")
    if e.top_n and not e.describe:
        raise InvalidArgument("top_n goes with describe", field=f"{f}.top_n")
    return LatentEdit(
        sae=e.sae,
        op=enum_value(OPS, e.op, f"{f}.op"),
        latents=tuple(int(i) for i in e.latents),
        labels=tuple(e.labels),
        value=float(e.value),
        normalize=e.normalize,
        condition=condition_from_proto(e.condition, f"{f}.condition") if e.HasField("condition") else None,
        describe=e.describe,
        top_n=e.top_n or 1,
    )


def vector_from_proto(v: pb.VectorEdit, f: str) -> VectorEdit:
    """A VectorEdit: a declared vector by name, or inline values with their site (not both)."""
    if bool(v.vector) == bool(v.values):
        raise InvalidArgument("name a declared vector or give inline values, exactly one of the two", field=f"{f}.vector")
    if v.vector and v.site:
        raise InvalidArgument("a declared vector's site comes from the config; leave site empty", field=f"{f}.site")
    if v.values and not v.site:
        raise InvalidArgument("inline values need their hook site", field=f"{f}.site")
    op = enum_value(OPS, v.op, f"{f}.op")
    if op not in VECTOR_OPS:
        raise InvalidArgument("a vector takes EDIT_OP_ADD, EDIT_OP_PROJECT_SET or EDIT_OP_PROJECT_CAP", field=f"{f}.op")
    return VectorEdit(
        vector=v.vector,
        values=tuple(float(x) for x in v.values),
        site=v.site,
        op=op,
        value=float(v.value) if v.HasField("value") else 1.0,
        normalize=v.normalize,
        condition=condition_from_proto(v.condition, f"{f}.condition") if v.HasField("condition") else None,
    )


def plan_from_proto(msg: pb.InterventionPlan, field: str = "plan") -> InterventionPlan:
    """An InterventionPlan (InvalidArgument naming ``<field>.<proto field>`` for malformed parts)."""
    s = msg.scope
    scope = Scope(
        tokens=enum_value(TOKEN_SCOPES, s.tokens, f"{field}.scope.tokens"),
        vision=enum_value(VISION_SCOPES, s.vision, f"{field}.scope.vision"),
        mask=mask_from_proto(s.mask, f"{field}.scope.mask") if s.HasField("mask") else None,
        step_start=s.step_start,
        step_end=s.step_end if s.HasField("step_end") else None,
        cfg_half=enum_value(CFG_HALVES, s.cfg_half, f"{field}.scope.cfg_half"),
    )
    for n, name in enumerate(msg.presets):
        if not name:
            raise InvalidArgument("a preset name is non-empty", field=f"{field}.presets[{n}]")
    return InterventionPlan(
        edits=tuple(_edit_from_proto(e, f"{field}.edits[{n}]") for n, e in enumerate(msg.edits)),
        scope=scope,
        preserve_error=msg.preserve_error if msg.HasField("preserve_error") else True,
        vectors=tuple(vector_from_proto(v, f"{field}.vectors[{n}]") for n, v in enumerate(msg.vectors)),
        stop_when=condition_from_proto(msg.stop_when, f"{field}.stop_when") if msg.HasField("stop_when") else None,
        presets=tuple(msg.presets),
    )


def check_plan_limits(plans: Sequence[tuple[str, pb.InterventionPlan]], limits: Limits) -> None:
    """TooLarge for more variants than ``limits.max_variants`` (field ``variants``) or more inline
    vector floats over all of a request's plans than ``limits.max_inline_vector_dims`` (naming the
    vector whose values cross the cap). ``plans``: (field, message), the main plan first."""
    n_variants = len(plans) - 1
    if n_variants > limits.max_variants:
        raise TooLarge(f"{n_variants} variants exceed the limit of {limits.max_variants}", field="variants")
    total = 0
    for field, msg in plans:
        for n, v in enumerate(msg.vectors):
            total += len(v.values)
            if total > limits.max_inline_vector_dims:
                raise TooLarge(f"{total} inline vector floats exceed the limit of {limits.max_inline_vector_dims}",
                               field=f"{field}.vectors[{n}].values")


# -- sae_runtime -> proto -----------------------------------------------------------------------


def condition_to_proto(c: Condition) -> pb.Condition:
    if not c.is_leaf:
        return pb.Condition(all_of=[condition_to_proto(x) for x in c.all_of], any_of=[condition_to_proto(x) for x in c.any_of])
    msg = pb.Condition(sae=c.sae, compare=_COMPARES_PB[Compare(c.compare)], threshold=c.threshold)
    if c.latent is not None:  # a resolved label is sent as the latent it names (a leaf names one of the two)
        msg.latent = int(c.latent)
    else:
        msg.label = c.label
    return msg


def plan_to_proto(plan: InterventionPlan) -> pb.InterventionPlan:
    """The wire form of a plan (a request's, or one as run). A vector's resolved ``direction`` is
    not sent: a declared vector keeps its name, an inline one its values and site."""
    msg = pb.InterventionPlan(preserve_error=plan.preserve_error, presets=list(plan.presets))
    for e in plan.edits:
        edit = msg.edits.add(sae=e.sae, op=_OPS_PB[EditOp(e.op)], latents=[int(i) for i in e.latents], labels=list(e.labels),
                             value=e.value, normalize=e.normalize, describe=e.describe,
                             top_n=e.top_n if e.describe else 0)  # fmt: skip
        if e.condition is not None:
            edit.condition.CopyFrom(condition_to_proto(e.condition))
    for v in plan.vectors:
        vector = msg.vectors.add(vector=v.vector, values=list(v.values), site=str(v.site) if not v.vector else "",
                                 op=_OPS_PB[EditOp(v.op)], value=v.value, normalize=v.normalize)  # fmt: skip
        if v.condition is not None:
            vector.condition.CopyFrom(condition_to_proto(v.condition))
    if plan.stop_when is not None:
        msg.stop_when.CopyFrom(condition_to_proto(plan.stop_when))
    s = plan.scope
    msg.scope.tokens = _TOKEN_SCOPES_PB[TokenScope(s.tokens)]
    msg.scope.vision = _VISION_SCOPES_PB[VisionScope(s.vision)]
    msg.scope.cfg_half = _CFG_HALVES_PB[CfgHalf(s.cfg_half)]
    msg.scope.step_start = s.step_start
    if s.step_end is not None:
        msg.scope.step_end = s.step_end
    if s.mask is not None:
        h, w = s.mask.shape
        msg.scope.mask.CopyFrom(pb.Mask(height=h, width=w, values=s.mask.reshape(-1).tolist()))
    return msg
