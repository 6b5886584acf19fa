"""Request-side specs for steering: InterventionPlan, LatentEdit, Scope, ReadoutSpec.

Frozen dataclasses built by the service (or by library users) and validated once, by
:meth:`InterventionPlan.resolve` (:mod:`sae_runtime.plan_resolve`), against the SAEs a model has. Validation resolves labels to latent indices, so everything downstream sees
plain integer indices. Semantics are those of reference.md section 4.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from torch import Tensor

from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.vectors import SteeringVector


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
        from sae_runtime.plan_resolve import resolve_plan  # validation lives beside the specs, not in them

        return resolve_plan(self, saes, max_edits=max_edits, field_prefix=field_prefix, vectors=vectors,
                            presets=presets, describe=describe, site_width=site_width, sae_sites=sae_sites,
                            max_inline_vector_dims=max_inline_vector_dims)

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
