"""Request-side specs for steering: InterventionPlan, LatentEdit, Scope, ReadoutSpec.

Frozen dataclasses built by the service (or by library users) and validated once, here, against
the SAEs a model has. Validation resolves labels to latent indices, so everything downstream sees
plain integer indices. Semantics are those of reference.md section 4.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument, NotFound, SaeRuntimeError, TooLarge, require_finite
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.vectors import SteeringVector, resolve_direction


class EditOp(str, enum.Enum):
    """What an edit does to latent f_i at each position in scope."""

    SET = "set"  # f_i = v (clamp)
    ABLATE = "ablate"  # f_i = 0
    SCALE = "scale"  # f_i *= v
    ADD = "add"  # f_i += v (additive decoder-direction steering)
    CAP = "cap"  # f_i = min(f_i, v)
    # Projection edits act on the activation x along u = W_dec[i] / ||W_dec[i]|| (or a steering
    # vector's unit direction), c = <x, u>:
    PROJECT_SET = "project_set"  # x' = x - c u + v u (orthogonal decomposition, component set to v)
    PROJECT_CAP = "project_cap"  # x' = x - c u + min(c, v) u (component capped at v)

#: Ops a steering vector takes (``add`` is x' = x + v d, d its direction; see :class:`VectorEdit`).
VECTOR_OPS = frozenset({EditOp.ADD, EditOp.PROJECT_SET, EditOp.PROJECT_CAP})


class Compare(str, enum.Enum):
    """How a condition leaf compares a latent with its threshold (strictly)."""

    ABOVE = "above"  # f_i > threshold
    BELOW = "below"  # f_i < threshold


#: Deepest condition tree a request may send (a leaf alone has depth 1).
MAX_CONDITION_DEPTH = 4


@dataclass(frozen=True)
class Condition:
    """A predicate on one position's *unedited* latents (the SAE's encoding of the activation as it
    enters that SAE's site in this forward, before any edit at that site).

    A leaf names one latent (``latent`` index or ``label``) of SAE ``sae`` and compares it with
    ``threshold`` (``compare``). A node combines children: ``all_of`` (AND) or ``any_of`` (OR),
    exactly one of them non-empty, and then the leaf fields are unset. Depth <= MAX_CONDITION_DEPTH.
    The leaf's SAE must sit at the edited site or one computed earlier in the same forward.
    """

    sae: str = ""
    latent: int | None = None
    label: str = ""
    compare: Compare = Compare.ABOVE
    threshold: float = 0.0
    all_of: tuple["Condition", ...] = ()
    any_of: tuple["Condition", ...] = ()

    @property
    def is_leaf(self) -> bool:
        return not self.all_of and not self.any_of

    def leaves(self) -> tuple["Condition", ...]:
        if self.is_leaf:
            return (self,)
        return tuple(leaf for child in self.all_of + self.any_of for leaf in child.leaves())


class TokenScope(str, enum.Enum):
    """Causal-LM positions: ``prompt`` = computed in the prefill pass, ``generated`` = decode steps."""

    ALL = "all"
    PROMPT = "prompt"
    GENERATED = "generated"


class VisionScope(str, enum.Enum):
    """Vision-encoder positions: every token, or the CLS token (position 0) only."""

    ALL = "all"
    CLS = "cls"


class CfgHalf(str, enum.Enum):
    """Which classifier-free-guidance half of a U-Net batch an image edit touches."""

    BOTH = "both"
    COND = "cond"
    UNCOND = "uncond"


@dataclass(frozen=True)
class LatentEdit:
    """One operation on some latents of one SAE.

    ``latents`` are indices; ``labels`` name latents by their concept label (``color:red``) and
    are resolved into ``latents`` by :meth:`InterventionPlan.resolve`. ``normalize`` applies to
    ``add`` only: the added direction is scaled by ||x|| / ||W_dec[i]|| (norm-relative steering),
    so ``value`` is then a fraction of the activation's norm.
    """

    sae: str
    op: EditOp
    latents: tuple[int, ...] = ()
    value: float = 0.0
    normalize: bool = False
    labels: tuple[str, ...] = ()
    #: Apply only at positions where this holds (None = every position in scope).
    condition: Condition | None = None
    #: Name latents by meaning: the ``top_n`` labelled latents of ``sae`` whose label best matches
    #: this text (semantic search) are added to ``latents`` at validation.
    describe: str = ""
    top_n: int = 1


@dataclass(frozen=True)
class VectorEdit:
    """One operation with a steering vector: a direction d at a hook site.

    Either ``vector`` names one declared in the model's config, or ``values`` gives d inline with
    its ``site`` (a hook name, e.g. ``blocks.2.hook_resid_post``; size-limited). ``op``:
    ``add`` x' = x + value * d (``normalize``: x' = x + value * ||x|| * d / ||d||), or
    ``project_set`` / ``project_cap`` with u = d / ||d|| (see :class:`EditOp`). Applied at every
    position in the plan's scope (and where ``condition`` holds), after the site's SAE edits.
    """

    vector: str = ""
    values: tuple[float, ...] = ()
    site: str = ""
    op: EditOp = EditOp.ADD
    value: float = 1.0
    normalize: bool = False
    condition: Condition | None = None
    #: Set by validation: the direction (d_site,) on the model's device, and ``site`` canonical.
    direction: Tensor | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Scope:
    """Where a plan applies. Each hook site reads the fields that concern it.

    - ``tokens``: causal-LM positions (language model of a LLaVA too).
    - ``vision``: vision-encoder positions.
    - ``mask``: U-Net spatial mask (H, W) at image resolution, values in [0, 1]; None = everywhere.
      Downsampled to each block's resolution by the backend.
    - ``step_start``/``step_end``: denoising-step window [start, end); end None = to the last step.
    - ``cfg_half``: which classifier-free-guidance half of the U-Net batch is edited.
    """

    tokens: TokenScope = TokenScope.ALL
    vision: VisionScope = VisionScope.ALL
    mask: Tensor | None = field(default=None, compare=False)
    step_start: int = 0
    step_end: int | None = None
    cfg_half: CfgHalf = CfgHalf.BOTH


@dataclass(frozen=True)
class InterventionPlan:
    """A request's latent edits, where they apply, and whether the SAE error term is kept.

    With ``preserve_error`` (default) the hooked activation becomes
    ``x + sum over edited i of (f'_i - f_i) * W_dec[i]``; an empty plan changes nothing.
    Without it the activation is replaced by the reconstruction of the edited latents, D(f').
    """

    edits: tuple[LatentEdit, ...] = ()
    scope: Scope = Scope()
    preserve_error: bool = True
    #: Steering-vector edits, applied per site after that site's SAE edits.
    vectors: tuple[VectorEdit, ...] = ()
    #: End the request (finish_reason "condition") at the first generated position where this holds.
    stop_when: Condition | None = None
    #: Names of presets from the model's config; their edits and vectors are prepended at validation.
    presets: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        """No edit changes any activation (a plan with only ``stop_when`` is empty: it only reads)."""
        return not self.edits and not self.vectors and not self.presets

    @property
    def sae_names(self) -> frozenset[str]:
        return frozenset(e.sae for e in self.edits)

    @property
    def stop_leaves(self) -> tuple["Condition", ...]:
        return () if self.stop_when is None else self.stop_when.leaves()

    def resolve(
        self, saes: Mapping[str, Sae], *, max_edits: int = 4096, field_prefix: str = "plan",
        vectors: Mapping[str, SteeringVector] = {}, presets: Mapping[str, "InterventionPlan"] = {},
        describe: Callable[[str, str, int], Sequence[int]] | None = None,
        site_width: Callable[[HookSite], int] | None = None,
        sae_sites: Mapping[str, HookSite] = {},
        max_inline_vector_dims: int = 16384,
    ) -> "InterventionPlan":
        """Validate against the model's SAEs and return the plan with everything resolved.

        - ``presets`` (name -> plan): each name in ``self.presets`` is expanded; its edits and
          vectors come first (in preset order), then the plan's own. A preset's own scope,
          preserve_error, stop_when and presets are ignored. The result has ``presets=()``.
        - ``describe(sae, text, top_n)`` -> latent indices, for edits naming latents by ``describe``.
        - Labels become indices (``labels=()``); an edit's latents are its own, then its labels',
          then the described ones (duplicates dropped), and ``describe`` is cleared; condition
          leaves get ``latent`` set from their ``label`` (and ``label`` cleared). Resolving a
          resolved plan again gives the same plan.
        - ``vectors`` (declared steering vectors); each :class:`VectorEdit` gets ``site`` (canonical
          name) and ``direction`` (float32 (d,), CPU) set and ``values=()``. ``site_width(site)``
          checks every direction's length; inline floats over the plan are capped by
          ``max_inline_vector_dims``.
        - ``sae_sites`` (every SAE's site): a condition leaf's SAE must sit at the edited site or
          at one computed earlier in the same forward (:meth:`HookSite.readable_from`);
          ``stop_when`` leaves must sit at text sites.

        Raises NotFound (unknown SAE, label, preset, vector or site), InvalidArgument (index out of
        range, non-finite value, bad condition, width mismatch, bad scope) or TooLarge (more than
        ``max_edits`` latents + vectors, inline vectors too large), naming the request field.
        """
        p = field_prefix
        edits: list[tuple[LatentEdit, str]] = []
        vecs: list[tuple[VectorEdit, str]] = []
        for n, name in enumerate(self.presets):
            if name not in presets:
                raise NotFound(f"unknown preset {name!r} (available: {', '.join(sorted(presets)) or 'none'})",
                               field=f"{p}.presets[{n}]")
            pre = presets[name]
            edits += [(e, f"{p}.presets[{n}].edits[{i}]") for i, e in enumerate(pre.edits)]
            vecs += [(v, f"{p}.presets[{n}].vectors[{i}]") for i, v in enumerate(pre.vectors)]
        edits += [(e, f"{p}.edits[{i}]") for i, e in enumerate(self.edits)]
        vecs += [(v, f"{p}.vectors[{i}]") for i, v in enumerate(self.vectors)]
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
        if self.stop_when is not None:
            stop = checker.check(self.stop_when, f"{p}.stop_when", None, stop=True)
        return replace(self, edits=tuple(resolved), vectors=tuple(resolved_vecs), stop_when=stop, presets=(),
                       scope=_check_scope(self.scope, f"{p}.scope"))


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


def _check_scope(scope: Scope, field: str) -> Scope:
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


#: Scope fields each model kind reads; any other field set away from its default is refused.
SCOPE_FIELDS_BY_KIND: dict[str, frozenset[str]] = {
    "causal_lm": frozenset({"tokens"}),
    "llava": frozenset({"tokens", "vision"}),
    "sdxl_turbo": frozenset({"mask", "step_start", "step_end", "cfg_half"}),
}
_SCOPE_DEFAULTS = {"tokens": TokenScope.ALL, "vision": VisionScope.ALL, "mask": None, "step_start": 0,
                   "step_end": None, "cfg_half": CfgHalf.BOTH}


def check_scope_applies(scope: Scope, kind: str, field: str = "plan.scope") -> None:
    """InvalidArgument naming the first scope field that ``kind`` models do not read but that is set
    (a vision scope or a mask on a causal LM, a token scope on SDXL-Turbo), instead of ignoring it."""
    applies = SCOPE_FIELDS_BY_KIND.get(kind)
    if applies is None:
        return
    for name, default in _SCOPE_DEFAULTS.items():
        value = getattr(scope, name)
        is_set = value is not None if default is None else value != default
        if name not in applies and is_set:
            raise InvalidArgument(f"does not apply to a {kind} model (it reads only {', '.join(sorted(applies))})",
                                  field=f"{field}.{name}")


def check_seed(seed: object, field: str) -> None:
    """A request seed is an integer in [0, 2**64) (the API's uint64)."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InvalidArgument(f"must be an integer in [0, 2**64), got {seed!r}", field=field)


@dataclass(frozen=True)
class ReadoutSpec:
    """Which SAEs to read latents from, and how many top latents to keep per position."""

    saes: tuple[str, ...] = ()
    top_k: int = 5

    def check(self, saes: Mapping[str, Sae], field_prefix: str = "readout") -> None:
        for n, name in enumerate(self.saes):
            if name not in saes:
                raise NotFound(f"unknown SAE {name!r}", field=f"{field_prefix}.saes[{n}]")
        if not 0 < self.top_k <= 256:
            raise InvalidArgument("top_k must be in [1, 256]", field=f"{field_prefix}.top_k")
