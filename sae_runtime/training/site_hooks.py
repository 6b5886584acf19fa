"""Read or replace the activation at a hook site of a HuggingFace model, for the training tools.

``attach(model, hook_name, fn)`` calls ``fn(activation)`` on every forward pass; ``fn`` returns
None (read only) or a tensor of the same shape that replaces the activation. Hook names follow
reference.md section 3: ``blocks.L.hook_resid_pre`` (input of decoder layer L),
``blocks.L.hook_resid_post`` / ``layers.L`` / ``resid_L`` (output of layer L), ``blocks.L.hook_mlp_out``
(output of layer L's MLP), or any module path of the model (its output).

This is the training toolkit's own minimal resolver; it is independent of the serving path's
``sae_runtime.sites`` so that the trainer can be used (and tested) on its own.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sae_runtime.errors import NotFound

ActivationFn = Callable[[Tensor], "Tensor | None"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out)$")
_LAYER = re.compile(r"^(?:layers\.|resid_)(\d+)$")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (``model.layers``, ``transformer.h``, ...)."""
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h", "gpt_neox.layers", "layers", "h"):
        mod: nn.Module | None = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    raise NotFound("cannot find the decoder layers of this model", field="hook_name")


def resolve(model: nn.Module, hook_name: str) -> tuple[nn.Module, str]:
    """(module, "input" | "output") that the hook name reads."""
    m = _BLOCK.match(hook_name)
    layer_idx, kind = (int(m.group(1)), m.group(2)) if m else (None, None)
    if m is None and (m2 := _LAYER.match(hook_name)):
        layer_idx, kind = int(m2.group(1)), "hook_resid_post"
    if layer_idx is not None:
        layers = decoder_layers(model)
        if not 0 <= layer_idx < len(layers):
            raise NotFound(f"layer {layer_idx} out of range (model has {len(layers)})", field="hook_name")
        layer = layers[layer_idx]
        if kind == "hook_resid_pre":
            return layer, "input"
        if kind == "hook_mlp_out":
            mlp = getattr(layer, "mlp", None)
            if mlp is None:
                raise NotFound(f"layer {layer_idx} has no .mlp", field="hook_name")
            return mlp, "output"
        return layer, "output"
    modules = dict(model.named_modules())
    if hook_name in modules and hook_name:
        return modules[hook_name], "output"
    raise NotFound(f"unknown hook site {hook_name!r}", field="hook_name")


def attach(model: nn.Module, hook_name: str, fn: ActivationFn) -> RemovableHandle:
    """Run ``fn`` on the activation at ``hook_name`` in every forward; remove with ``.remove()``."""
    module, where = resolve(model, hook_name)
    if where == "input":

        def pre_hook(_mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_mod, _args, output):
        act = output[0] if isinstance(output, tuple) else output
        new = fn(act)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)
