"""Steering vectors: named directions at hook sites (declared in the config or given inline).

A :class:`SteeringVector` is what a :class:`~sae_runtime.plan.VectorEdit` resolves to at
validation: the site it acts on and its direction, on the model's device and dtype. Files are
safetensors holding one 1-D tensor (never a pickle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import Tensor

from sae_runtime.errors import InvalidArgument
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
        raise InvalidArgument(f"a steering vector is one non-empty 1-D tensor, got shape {tuple(tensor.shape)}", field=field)
    if not torch.isfinite(tensor).all():
        raise InvalidArgument("has non-finite values", field=field)
    return SteeringVector(name, HookSite.parse(hook_name, field=f"{field}.hook_name"), tensor.float())


__all__ = ["SteeringVector", "load_vector"]
