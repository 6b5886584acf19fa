"""Steering vectors: named directions at hook sites (declared in the config or given inline).

A :class:`SteeringVector` is what a :class:`~sae_runtime.plan.VectorEdit` resolves to at
validation: the site it acts on and its direction, on the model's device and dtype. Files are
safetensors holding one 1-D tensor (never a pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor

from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.sites import HookSite


@dataclass(frozen=True)
class SteeringVector:
    """A direction (d_site,) at ``site``. ``name`` is its config name, or "" for an inline vector."""

    name: str
    site: HookSite
    direction: Tensor

    @property
    def unit(self) -> Tensor:
        """d / ||d|| (zero stays zero)."""
        norm = self.direction.norm()
        return self.direction / norm if float(norm) > 0 else self.direction


def load_vector(name: str, path: str, hook_name: str, tensor_key: str | None = None) -> SteeringVector:
    """Read a steering vector from a safetensors file: the tensor ``tensor_key``, or its only one.

    InvalidArgument (field ``vectors.<name>``) when the file holds no single 1-D finite tensor.
    """
    field = f"vectors.{name}"
    tensors = load_file(path)
    if tensor_key is None:
        if len(tensors) != 1:
            raise InvalidArgument(f"{path} holds {len(tensors)} tensors; name one with tensor_key", field=field)
        (tensor,) = tensors.values()
    elif tensor_key in tensors:
        tensor = tensors[tensor_key]
    else:
        raise InvalidArgument(f"{path} has no tensor {tensor_key!r} (has {', '.join(sorted(tensors))})", field=field)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise InvalidArgument(f"a steering vector is one non-empty 1-D tensor, got shape {tuple(tensor.shape)}",
                              field=field)
    if not torch.isfinite(tensor).all():
        raise InvalidArgument("has non-finite values", field=field)
    return SteeringVector(name, HookSite.parse(hook_name, field=f"{field}.hook_name"), tensor.float())


def resolve_direction(
    vector: str, values: Sequence[float], site: str, field: str, *,
    vectors: Mapping[str, SteeringVector], site_width: Callable[[HookSite], int] | None,
    resolved: Tensor | None = None,
) -> tuple[HookSite, Tensor]:
    """The site and direction (d,) float32 of one vector edit: the declared vector ``vector`` (a key
    of ``vectors``) or the inline ``values`` at ``site``; ``field`` is the edit's request field.

    NotFound: unknown vector or site. InvalidArgument: neither or both given, a site that differs
    from the declared vector's, non-finite or empty values, or a direction whose length is not
    ``site_width(site)`` (when given).
    """
    if resolved is not None and not values and site:  # an edit validated before: its direction is inline
        values = resolved.detach().float().flatten().tolist()
        vector = ""
    if bool(vector) == bool(values):
        raise InvalidArgument("give exactly one of vector (a declared name) or values (inline)",
                              field=f"{field}.vector")
    if vector:
        if vector not in vectors:
            raise NotFound(f"unknown steering vector {vector!r} (available: {', '.join(sorted(vectors)) or 'none'})",
                           field=f"{field}.vector")
        sv = vectors[vector]
        if site and HookSite.parse(site, field=f"{field}.site") != sv.site:
            raise InvalidArgument(f"vector {vector!r} acts at {sv.site.name}, not {site}", field=f"{field}.site")
        hook, direction, where = sv.site, sv.direction.detach().float().flatten(), f"{field}.vector"
    else:
        if not site:
            raise InvalidArgument("an inline vector needs its site (hook name)", field=f"{field}.site")
        hook, where = HookSite.parse(site, field=f"{field}.site"), f"{field}.values"
        try:
            direction = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            raise InvalidArgument("values must be numbers", field=where) from None
        if not torch.isfinite(direction).all():
            raise InvalidArgument("has non-finite values", field=where)
    if site_width is not None:
        width = int(site_width(hook))
        if width != direction.numel():
            raise InvalidArgument(f"a {direction.numel()}-dim vector for site {hook.name} of width {width}",
                                  field=where)
    return hook, direction


__all__ = ["SteeringVector", "load_vector", "resolve_direction"]
