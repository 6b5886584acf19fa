"""Hook sites: parse the names SAE files use, find the module on a model, attach hooks.

A :class:`HookSite` is where an SAE reads (and edits) activations (reference.md section 3):

========================================  ==================================================
name (and accepted aliases)               activation, shape seen by a site callback
========================================  ==================================================
``blocks.L.hook_resid_pre``               input of decoder layer L, (B, T, d_model)
``blocks.L.hook_resid_post``              output of decoder layer L (first element of a tuple);
  aliases: sparsify ``layers.L``,           (B, T, d_model)
  dictionary_learning ``resid_L``,
  HF paths ``model.layers.L``,
  ``model.language_model.layers.L``,
  ``language_model.model.layers.L``,
  ``transformer.h.L``
``blocks.L.hook_mlp_out``                 output of layer L's MLP, (B, T, d_model)
  alias: ``layers.L.mlp``
``blocks.L.hook_mlp_io``                  layer L's MLP input and output side by side, for
                                          transcoders (FF-KV): (B, T, 2 * d_model) =
                                          cat(input, output); a new value's second half
                                          becomes the MLP output (the first is ignored)
``vision.layers.L``                       output of vision encoder (CLIP) layer L, all tokens
  aliases: ``vision_tower.vision_model.     incl. CLS at position 0, (B, 1 + patches, d_vision)
  encoder.layers.L``, ``model.vision_tower.
  encoder.layers.L``
``unet.down_blocks.I.attentions.J``,      a U-Net transformer block's UPDATE (output minus
``unet.mid_block.attentions.J``,          input), NCHW permuted to NHWC and flattened:
``unet.up_blocks.I.attentions.J``         (B, H * W, C), one SAE input per spatial position
  (the ``unet.`` prefix is optional)
========================================  ==================================================

Layer sites work on any HF causal LM (the decoder layer list is found generically, not by model
class) and on the language model / vision tower of a LlavaForConditionalGeneration; SAELens names
on a LLaVA address its language model. U-Net sites work on a UNet2DConditionModel or on anything
with a ``.unet`` attribute (a diffusers pipeline).

A site callback ``fn(x, grid)`` receives the activation in the layout above (``grid`` is the
block's (H, W) for U-Net sites, else None) and returns the new activation, or None to leave it
unchanged. On a U-Net site the block output becomes ``output + (new - x)`` permuted back.
Hooks are attached with :func:`attached` (a context manager that always removes them).
"""

from __future__ import annotations

import enum
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sae_runtime.errors import InvalidArgument, NotFound

#: A site callback: (activation, U-Net grid (H, W) or None) -> new activation or None (unchanged).
SiteFn = Callable[[Tensor, Optional[tuple[int, int]]], Optional[Tensor]]


class SiteKind(str, enum.Enum):
    RESID_PRE = "resid_pre"
    RESID_POST = "resid_post"
    MLP_OUT = "mlp_out"
    MLP_IO = "mlp_io"
    VISION_LAYER = "vision_layer"
    UNET_BLOCK = "unet_block"


_TEXT_KINDS = (SiteKind.RESID_PRE, SiteKind.RESID_POST, SiteKind.MLP_OUT, SiteKind.MLP_IO)

_PATTERNS: tuple[tuple[re.Pattern[str], SiteKind], ...] = tuple(
    (re.compile(p), k)
    for p, k in (
        (r"blocks\.(\d+)\.hook_resid_pre", SiteKind.RESID_PRE),
        (r"blocks\.(\d+)\.hook_resid_post", SiteKind.RESID_POST),
        (r"blocks\.(\d+)\.hook_mlp_out", SiteKind.MLP_OUT),
        (r"blocks\.(\d+)\.hook_mlp_io", SiteKind.MLP_IO),
        (r"layers\.(\d+)\.mlp", SiteKind.MLP_OUT),
        (r"resid_(\d+)", SiteKind.RESID_POST),
        (r"(?:model\.|model\.language_model\.|language_model\.model\.)?layers\.(\d+)", SiteKind.RESID_POST),
        (r"transformer\.h\.(\d+)", SiteKind.RESID_POST),
        (r"vision\.layers\.(\d+)", SiteKind.VISION_LAYER),
        (r"(?:model\.)?vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)", SiteKind.VISION_LAYER),
        (r"(?:unet\.)?((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)",
         SiteKind.UNET_BLOCK),
    )
)

_SUPPORTED = (
    "blocks.L.hook_resid_pre|hook_resid_post|hook_mlp_out|hook_mlp_io, layers.L, layers.L.mlp, resid_L, "
    "vision.layers.L, unet.down_blocks.I.attentions.J, unet.mid_block.attentions.J, unet.up_blocks.I.attentions.J"
)


@dataclass(frozen=True)
class HookSite:
    """Where an SAE is attached: a kind plus a layer index (text/vision) or a U-Net block path."""

    kind: SiteKind
    layer: int = -1
    #: U-Net block path below the UNet, e.g. ``down_blocks.2.attentions.1`` (U-Net kind only).
    block: str = ""

    # -- names -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, name: str, field: str = "hook_name") -> "HookSite":
        """Parse any accepted name (see the module docstring); NotFound naming ``field`` otherwise."""
        if not isinstance(name, str):
            raise NotFound(f"hook site must be a string, got {name!r}", field=field)
        for pattern, kind in _PATTERNS:
            m = pattern.fullmatch(name.strip())
            if m:
                if kind is SiteKind.UNET_BLOCK:
                    return cls(kind, block=m.group(1))
                return cls(kind, layer=int(m.group(1)))
        raise NotFound(f"unknown hook site {name!r} (supported: {_SUPPORTED})", field=field)

    @property
    def name(self) -> str:
        """Canonical name: SAELens names for text sites, ``vision.layers.L``, ``unet.<block>``."""
        if self.kind is SiteKind.UNET_BLOCK:
            return f"unet.{self.block}"
        if self.kind is SiteKind.VISION_LAYER:
            return f"vision.layers.{self.layer}"
        return f"blocks.{self.layer}.hook_{self.kind.value}"

    def __str__(self) -> str:
        return self.name

    @property
    def is_text(self) -> bool:
        """True for causal-LM sites (token positions, prompt/generated scopes, valid masks apply)."""
        return self.kind in _TEXT_KINDS

    @property
    def order(self) -> tuple[int, int, int] | None:
        """When this site is computed in a forward, as a sort key (None for U-Net blocks: no order).

        Vision-tower layers (0, L, 0) come before every language-model site; in decoder layer L,
        ``hook_resid_pre`` (1, L, 0) precedes the MLP sites ``hook_mlp_out`` / ``hook_mlp_io``
        (1, L, 1: the same hook time, neither precedes the other), which precede
        ``hook_resid_post`` (1, L, 2).
        """
        if self.kind is SiteKind.UNET_BLOCK:
            return None
        if self.kind is SiteKind.VISION_LAYER:
            return (0, self.layer, 0)
        rank = {SiteKind.RESID_PRE: 0, SiteKind.MLP_OUT: 1, SiteKind.MLP_IO: 1, SiteKind.RESID_POST: 2}[self.kind]
        return (1, self.layer, rank)

    def readable_from(self, earlier: "HookSite") -> bool:
        """True when a latent computed at site ``earlier`` is known, position by position, when this
        site runs in the same forward: the same site, or a strictly earlier one of the same position
        space (vision tokens or text tokens; U-Net blocks only the same block)."""
        if earlier == self:
            return True
        if self.order is None or earlier.order is None or self.order[0] != earlier.order[0]:
            return False
        return earlier.order < self.order

    # -- resolution --------------------------------------------------------------------------
    def resolve(self, model: nn.Module) -> nn.Module:
        """The module whose input or output this site reads. NotFound naming the site otherwise."""
        if self.kind is SiteKind.UNET_BLOCK:
            return self._resolve_unet(model)
        layers = vision_layers(model) if self.kind is SiteKind.VISION_LAYER else decoder_layers(model)
        if layers is None:
            what = "vision encoder" if self.kind is SiteKind.VISION_LAYER else "decoder layer list"
            raise NotFound(f"site {self.name}: model {type(model).__name__} has no {what}", field=self.name)
        if not 0 <= self.layer < len(layers):
            raise NotFound(f"site {self.name}: layer {self.layer} out of range (model has {len(layers)} layers)",
                           field=self.name)
        layer = layers[self.layer]
        if self.kind in (SiteKind.MLP_OUT, SiteKind.MLP_IO):
            return _mlp_of(layer, self.name)
        return layer

    def _resolve_unet(self, model: nn.Module) -> nn.Module:
        unet = getattr(model, "unet", model)
        module: Any = unet
        for part in self.block.split("."):
            if part.isdigit():
                if not isinstance(module, (nn.ModuleList, nn.Sequential)) or int(part) >= len(module):
                    module = None
                else:
                    module = module[int(part)]
            else:
                module = getattr(module, part, None)
            if module is None:
                raise NotFound(f"site {self.name}: {type(unet).__name__} has no block {self.block}", field=self.name)
        return module

    def width(self, model: nn.Module) -> int:
        """Size of the activation's last dimension at this site (d_model, d_vision or channels)."""
        if self.kind is SiteKind.UNET_BLOCK:
            block = self._resolve_unet(model)
            width = getattr(block, "in_channels", None) or getattr(getattr(block, "config", None), "in_channels", None)
            if width is None:
                raise NotFound(f"site {self.name}: cannot tell the block's channel count", field=self.name)
            return int(width)
        self.resolve(model)  # raises NotFound for a bad layer
        cfg = model.config
        if self.kind is SiteKind.VISION_LAYER:
            return int(cfg.vision_config.hidden_size)
        width = int(_text_config(cfg).hidden_size)
        return 2 * width if self.kind is SiteKind.MLP_IO else width

    def check_sae_width(self, model: nn.Module, d_in: int, sae_name: str) -> None:
        """InvalidArgument naming the SAE unless its d_in equals this site's width."""
        width = self.width(model)
        if d_in != width:
            raise InvalidArgument(
                f"SAE {sae_name!r} reads {d_in}-dim inputs but site {self.name} has width {width}", field=sae_name
            )

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, fn: SiteFn) -> RemovableHandle:
        """Register ``fn`` on the site's module; returns the handle (call ``.remove()``).

        Hooks are prepended so that they run before hooks transformers installs to record
        ``hidden_states`` (LLaVA's projector reads the recorded vision hidden states).
        """
        module = self.resolve(model)
        if self.kind is SiteKind.RESID_PRE:
            return module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True, prepend=True)
        if self.kind is SiteKind.UNET_BLOCK:
            return module.register_forward_hook(_update_hook(fn), with_kwargs=True, prepend=True)
        if self.kind is SiteKind.MLP_IO:
            return module.register_forward_hook(_io_hook(fn), with_kwargs=True, prepend=True)
        return module.register_forward_hook(_output_hook(fn), prepend=True)


def _input_hook(fn: SiteFn):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            new = fn(args[0], None)
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"], None)
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _output_hook(fn: SiteFn):
    def hook(module: nn.Module, args: tuple, output: Any):
        if isinstance(output, tuple):
            new = fn(output[0], None)
            return None if new is None else (new, *output[1:])
        new = fn(output, None)
        return new

    return hook


def _io_hook(fn: SiteFn):
    """MLP_IO: show fn cat(input, output) and keep the second half of its answer as the output."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        inp = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        new = fn(torch.cat([inp, out], dim=-1), None)
        if new is None:
            return None
        new_out = new[..., out.shape[-1]:]
        return (new_out, *output[1:]) if isinstance(output, tuple) else new_out

    return hook


def _update_hook(fn: SiteFn):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        inp = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output.sample
        b, c, h, w = out.shape
        update = (out - inp).permute(0, 2, 3, 1).reshape(b, h * w, c)
        new = fn(update, (h, w))
        if new is None:
            return None
        out = out + (new - update).reshape(b, h, w, c).permute(0, 3, 1, 2)
        if isinstance(output, tuple):
            return (out, *output[1:])
        return type(output)(sample=out)

    return hook


@contextmanager
def attached(model: nn.Module, hooks: Iterable[tuple[HookSite, SiteFn]]) -> Iterator[list[RemovableHandle]]:
    """Attach ``(site, fn)`` hooks for the duration of the block; always removes them."""
    handles: list[RemovableHandle] = []
    try:
        for site, fn in hooks:
            handles.append(site.attach(model, fn))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


# -- generic module discovery -------------------------------------------------------------------

_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, nn.ModuleList | None]]" = weakref.WeakKeyDictionary()


def _text_config(cfg: Any) -> Any:
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _layer_list(root: nn.Module, n: int | None) -> nn.ModuleList | None:
    """The ModuleList of ``n`` entries with the shortest path under ``root`` (None if absent)."""
    if n is None:
        return None
    best: tuple[int, nn.ModuleList] | None = None
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and "vision" not in name:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, module)
    return None if best is None else best[1]


def _cached(model: nn.Module, key: str, find: Callable[[], nn.ModuleList | None]) -> nn.ModuleList | None:
    per_model = _LAYER_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = find()
    return per_model[key]


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layer list of a causal LM (or of a multimodal model's language model).

    Found generically: the shortest-path ModuleList, under ``model.get_decoder()``, whose length
    is the text config's ``num_hidden_layers``.
    """

    def find() -> nn.ModuleList | None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(_text_config(cfg), "num_hidden_layers"):
            return None
        root = model.get_decoder() if hasattr(model, "get_decoder") else model
        return _layer_list(root if isinstance(root, nn.Module) else model, _text_config(cfg).num_hidden_layers)

    return _cached(model, "text", find)


def vision_layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder layer list of a multimodal model's vision tower (LLaVA: CLIP encoder layers)."""

    def find() -> nn.ModuleList | None:
        vision_cfg = getattr(getattr(model, "config", None), "vision_config", None)
        if vision_cfg is None:
            return None
        towers = [(n.count("."), m) for n, m in model.named_modules()
                  if n.split(".")[-1] in ("vision_tower", "vision_model")]
        if not towers:
            return None
        tower = min(towers, key=lambda t: t[0])[1]
        n = vision_cfg.num_hidden_layers
        lists = [(name.count("."), m) for name, m in tower.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n]
        return min(lists, key=lambda t: t[0])[1] if lists else None

    return _cached(model, "vision", find)


def _mlp_of(layer: nn.Module, site_name: str) -> nn.Module:
    for attr in ("mlp", "feed_forward", "ffn", "block_sparse_moe"):
        module = getattr(layer, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise NotFound(f"site {site_name}: decoder layer {type(layer).__name__} has no MLP submodule", field=site_name)


__all__ = ["HookSite", "SiteKind", "SiteFn", "attached", "decoder_layers", "vision_layers"]
