"""SAEs attached at hook sites, and the checks of plans and widths against them.

:class:`AttachedSae` names an SAE and the site it reads. :func:`check_widths` checks each SAE's
``d_in`` against its site's width on the model, :func:`check_vector_widths` each steering vector's
width; :func:`check_plan` checks that a (resolved) plan only names attached SAEs and that each
condition reads an SAE computed before the site it gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from torch import nn

from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.plan import InterventionPlan
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite

if TYPE_CHECKING:
    from sae_runtime.steering.directions import DirectionTable


@dataclass(frozen=True)
class AttachedSae:
    """An SAE under its name, attached at a hook site."""

    name: str
    sae: Sae
    site: HookSite


def check_widths(model: nn.Module, saes: Mapping[str, AttachedSae]) -> None:
    """InvalidArgument naming the SAE whose d_in differs from its site's width; NotFound for a bad site."""
    for name, att in saes.items():
        att.site.check_sae_width(model, att.sae.d_in, name)


def check_vector_widths(model: nn.Module, tables: Mapping[HookSite, DirectionTable], checked: set) -> None:
    """InvalidArgument (``plan.vectors``) for a steering vector table whose width differs from its
    site's. (site, width) pairs already in ``checked`` are skipped; those checked here are added."""
    for site, table in tables.items():
        if (site, table.dirs.shape[-1]) not in checked:
            width = site.width(model)
            if width != table.dirs.shape[-1]:
                raise InvalidArgument(f"a {table.dirs.shape[-1]}-dim steering vector for site {site.name} "
                                      f"of width {width}", field="plan.vectors")
            checked.add((site, width))


def check_plan(plan: InterventionPlan | None, saes: Mapping[str, AttachedSae], field: str) -> None:
    """NotFound for an edit or condition leaf naming an SAE not in ``saes``; InvalidArgument for an
    unresolved leaf, a ``stop_when`` leaf at a non-text site, or a condition whose SAE is not
    computed before the site it gates. ``field`` names the plan in the errors."""
    if plan is None:
        return
    for edit in plan.edits:
        if edit.sae not in saes:
            raise NotFound(f"unknown SAE {edit.sae!r}", field=field)
    edited = [(e.condition, saes[e.sae].site) for e in plan.edits if e.condition is not None]
    edited += [(v.condition, HookSite.parse(v.site, field=field)) for v in plan.vectors if v.condition is not None]
    stop = [(plan.stop_when, None)] if plan.stop_when is not None else []
    for cond, site in edited + stop:
        for leaf in cond.leaves():
            if leaf.sae not in saes:
                raise NotFound(f"unknown SAE {leaf.sae!r} in a condition", field=field)
            if leaf.latent is None:
                raise InvalidArgument("condition leaves must be resolved (InterventionPlan.resolve) first",
                                      field=field)
            at = saes[leaf.sae].site
            if site is None and not at.is_text:
                raise InvalidArgument(f"stop_when reads SAE {leaf.sae!r} at non-text site {at.name}", field=field)
            if site is not None and not site.readable_from(at):
                raise InvalidArgument(f"condition SAE {leaf.sae!r} at {at.name} is not computed before {site.name}",
                                      field=field)
