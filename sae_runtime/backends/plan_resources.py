"""What a model's plans may name besides its SAEs: steering vectors, presets and latent descriptions.

Built once when a backend loads (vectors read from their safetensors files and checked against
their sites' widths, presets validated like request plans), then used by every request's
validation: :meth:`PlanResources.resolve` is the one call that turns a request's plan into the
validated plan the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from sae_runtime.backends.spec import Limits, VectorSpec
from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import InterventionPlan
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.vectors import SteeringVector, load_vector

#: describe(sae, text, top_n) -> latent indices (semantic search over the SAE's labels).
Describe = Callable[[str, str, int], Sequence[int]]


@dataclass(frozen=True)
class PlanResources:
    """A model's SAEs (name -> Sae and site), declared vectors, validated presets and describer."""

    saes: Mapping[str, Sae]
    sae_sites: Mapping[str, HookSite]
    site_width: Callable[[HookSite], int]
    limits: Limits = Limits()
    vectors: Mapping[str, SteeringVector] = field(default_factory=dict)
    presets: Mapping[str, InterventionPlan] = field(default_factory=dict)
    describe: Describe | None = None

    def resolve(self, plan: InterventionPlan, *, field_prefix: str, max_edits: int | None = None) -> InterventionPlan:
        """``plan`` validated and resolved (presets expanded, labels / descriptions -> latents,
        vectors -> directions). Errors name the field under ``field_prefix``."""
        return plan.resolve(
            self.saes, max_edits=self.limits.max_edits if max_edits is None else max_edits, field_prefix=field_prefix,
            vectors=self.vectors, presets=self.presets, describe=self.describe, site_width=self.site_width,
            sae_sites=self.sae_sites, max_inline_vector_dims=self.limits.max_inline_vector_dims,
        )


def build_plan_resources(
    model: nn.Module, saes: Mapping[str, Sae], sae_sites: Mapping[str, HookSite], *, limits: Limits = Limits(),
    vectors: Sequence[VectorSpec] = (), presets: Sequence[tuple[str, InterventionPlan]] = (),
    describe: Describe | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> PlanResources:
    """Load ``vectors`` (InvalidArgument ``vectors.<name>`` for a width that is not its site's) and
    validate ``presets`` (errors name ``presets.<name>``); presets may not name presets."""
    widths: dict[HookSite, int] = {}

    def site_width(site: HookSite) -> int:
        if site not in widths:
            widths[site] = site.width(model)
        return widths[site]

    loaded: dict[str, SteeringVector] = {}
    for spec in vectors:
        vector = load_vector(spec.name, spec.path, spec.hook_name, spec.tensor_key)
        width = site_width(vector.site)
        if vector.direction.numel() != width:
            raise InvalidArgument(f"has {vector.direction.numel()} values but site {vector.site.name} has width {width}",
                                  field=f"vectors.{spec.name}")
        loaded[spec.name] = SteeringVector(spec.name, vector.site, vector.direction.to(device=device, dtype=dtype))
    base = PlanResources(saes, dict(sae_sites), site_width, limits, loaded, {}, describe)
    checked: dict[str, InterventionPlan] = {}
    for name, preset in presets:
        if preset.presets:
            raise InvalidArgument("a preset may not name other presets", field=f"presets.{name}.presets")
        base.resolve(preset, field_prefix=f"presets.{name}")  # errors at load, not per request
        checked[name] = preset  # kept as written: each request's validation expands and resolves it
    return PlanResources(saes, dict(sae_sites), site_width, limits, loaded, checked, describe)


__all__ = ["Describe", "PlanResources", "build_plan_resources"]
