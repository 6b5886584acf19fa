"""Read or replace the activation at a hook site, for the training tools.

``attach(model, hook_name, fn)`` calls ``fn(activation)`` on every forward pass; ``fn`` returns
None (read only) or a tensor of the same shape that replaces the activation. Hook names are those
of :class:`sae_runtime.sites.HookSite` (``blocks.L.hook_resid_post``, ``layers.L``, ``resid_L``,
``blocks.L.hook_resid_pre``, ``blocks.L.hook_mlp_out``, vision and U-Net sites, ...); any other
name is taken as a module path of the model, whose output is read.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sae_runtime.errors import NotFound
from sae_runtime.sites import HookSite

ActivationFn = Callable[[Tensor], "Tensor | None"]


def attach(model: nn.Module, hook_name: str, fn: ActivationFn) -> RemovableHandle:
    """Run ``fn`` on the activation at ``hook_name`` in every forward; remove with ``.remove()``."""
    try:
        site = HookSite.parse(hook_name)
    except NotFound:
        modules = dict(model.named_modules())
        if not hook_name or hook_name not in modules:
            raise
        site = None
    if site is not None:
        return site.attach(model, lambda x, _grid: fn(x))

    def hook(_mod: nn.Module, _args: tuple, output: object) -> object:
        act = output[0] if isinstance(output, tuple) else output
        new = fn(act)  # type: ignore[arg-type]
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return modules[hook_name].register_forward_hook(hook)
