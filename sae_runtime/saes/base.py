"""The SAE interface every architecture implements, and the registry that maps a config to a class.

Conventions (reference.md section 1): row vectors; ``x`` has shape (..., d_in), latents ``f`` have
shape (..., d_sae); ``W_enc`` is (d_in, d_sae) and ``W_dec`` is (d_sae, d_in).

An SAE may read a *normalised* input (SAELens ``constant_norm_rescale`` / ``layer_norm``, G-SAE's
per-token standardisation). Normalisation is affine per position, ``x = x_n * scale + shift``, so
an edit of the latents changes the activation by ``scale * (delta_f @ decoder_rows)``: this is what
lets steering add only the edited latents' contribution and keep the error term exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from sae_runtime.errors import InvalidArgument, NotFound

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass(frozen=True)
class SaeConfig:
    """What is needed to build an SAE module, independent of the file format it came from."""

    architecture: str
    d_in: int
    d_sae: int
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    #: One of NORMALIZATIONS. ``expected_average_only_in`` is folded into the weights at load time
    #: (so at run time it behaves as ``none``).
    normalize_activations: str = "none"
    #: Latents kept per position for topk-style architectures.
    k: int | None = None
    #: SAELens topk option: pre-acts times ||W_dec[i]|| before top-k, latents divided by it before decode.
    rescale_acts_by_decoder_norm: bool = False
    #: topk-sigmoid (G-SAE): the first ``n_concepts`` latents are the labelled concepts.
    n_concepts: int = 0
    #: The hook name the SAE was trained on, as written in its file (SAELens, sparsify, ...).
    hook_name: str | None = None
    model_name: str | None = None
    #: Anything else from the source config, kept for round trips (e.g. SAELens metadata).
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "SaeConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Norm:
    """Per-position affine normalisation: ``x = x_n * scale + shift``. Shapes (..., 1) or (..., d_in)."""

    scale: Tensor
    shift: Tensor | float = 0.0


class Sae(nn.Module):
    """Base class: a sparse autoencoder with ``encode``/``decode`` and selective encoding.

    Subclasses set ``architecture`` (the registry key), create their parameters in ``__init__``
    and implement :meth:`encode_normalized`. Parameter names follow SAELens (``W_enc``, ``b_enc``,
    ``W_dec``, ``b_dec``, ``threshold``, ...) so native and SAELens files share a state dict.
    """

    architecture: ClassVar[str]
    #: True when :meth:`encode_selected` costs O(k * d_in) (latent i depends only on column i).
    selective: ClassVar[bool] = False

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        #: Optional concept labels, label -> latent index (filled by loaders / labelling tools).
        self.labels: dict[str, int] = {}
        #: Optional per-latent activation statistics (d_sae,), e.g. sdxl-unbox ``mean.pt`` / ``std.pt``.
        #: Buffers registered as None: absent from the state dict until a loader sets them.
        self.register_buffer("latent_mean", None)
        self.register_buffer("latent_std", None)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # -- normalisation -----------------------------------------------------------------------
    def normalize(self, x: Tensor) -> tuple[Tensor, Norm | None]:
        """Map x (..., d_in) into the space the SAE was trained on. Returns (x_n, norm or None)."""
        mode = self.cfg.normalize_activations
        if mode in ("none", "expected_average_only_in"):
            return x, None
        if mode == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True).clamp_min(1e-12) / (self.cfg.d_in**0.5)
            return x / scale, Norm(scale=scale)
        if mode == "layer_norm":
            # As SAELens: unbiased std, eps added outside the root on the way in, not on the way out.
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), Norm(scale=std, shift=mu)
        raise InvalidArgument(f"unknown normalize_activations {mode!r}", field="normalize_activations")

    @staticmethod
    def denormalize(y: Tensor, norm: Norm | None) -> Tensor:
        return y if norm is None else y * norm.scale + norm.shift

    def sae_input(self, x_n: Tensor) -> Tensor:
        """x' in the encode formula: ``x_n - b_dec`` when apply_b_dec_to_input, else ``x_n``."""
        return x_n - self.b_dec if self.cfg.apply_b_dec_to_input else x_n

    # -- encode / decode ---------------------------------------------------------------------
    def encode_normalized(self, x_n: Tensor) -> Tensor:
        """Latents (..., d_sae) of an already-normalised input (..., d_in)."""
        raise NotImplementedError

    def encode_selected_normalized(self, x_n: Tensor, idx: Tensor) -> Tensor:
        """Latents (..., k) for the latent indices ``idx`` (k,). Default: full encode + gather."""
        return self.encode_normalized(x_n).index_select(-1, idx)

    def decoder_rows(self, idx: Tensor | None = None) -> Tensor:
        """Rows (k, d_in) that multiply latent values in decode (all rows when idx is None).

        Architectures that rescale latents before decoding fold that rescale in here, so that
        ``decode_normalized(f) == f @ decoder_rows() + b_dec`` always holds.
        """
        return self.W_dec if idx is None else self.W_dec.index_select(0, idx)

    def decode_normalized(self, f: Tensor) -> Tensor:
        """Reconstruction (..., d_in) in the normalised space."""
        return f @ self.decoder_rows() + self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """Latents (..., d_sae) of raw activations x (..., d_in)."""
        return self.encode_normalized(self.normalize(x)[0])

    def encode_selected(self, x: Tensor, idx: Tensor) -> Tensor:
        """Latents (..., k) for indices idx (k,) of raw activations x (..., d_in)."""
        return self.encode_selected_normalized(self.normalize(x)[0], idx)

    def decode(self, f: Tensor, norm: Norm | None = None) -> Tensor:
        """Reconstruction in activation space; pass the Norm returned by ``normalize(x)``."""
        return self.denormalize(self.decode_normalized(f), norm)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x (..., d_in)."""
        x_n, norm = self.normalize(x)
        return self.decode(self.encode_normalized(x_n), norm)

    def restrict(self, idx: Tensor) -> "Sae":
        """A copy that holds only the latents ``idx`` (k,), for selective architectures.

        Its ``encode_normalized(x_n)`` equals ``self.encode_selected_normalized(x_n, idx)`` but reads
        a small contiguous slice of the encoder: steering builds it once per request batch instead
        of gathering columns of the full W_enc on every forward. Per-latent tensors are sliced by
        SAELens naming: ``W_enc`` on axis 1, every other non-scalar tensor with d_sae rows on axis 0
        (``b_dec`` and ``W_dec``-independent scalars are kept). The copy is read-only: its tensors
        are plain attributes, not parameters or buffers.
        """
        if not self.selective:
            raise TypeError(f"{self.architecture} latents depend on all latents; use encode_selected")
        sub = build_sae(self.cfg.replace(d_sae=len(idx))).to(device=self.W_dec.device, dtype=self.W_dec.dtype)
        state = {}
        with torch.no_grad():
            for name, t in self.state_dict().items():
                if name == "W_enc":
                    t = t.index_select(1, idx)
                elif name != "b_dec" and t.dim() >= 1 and t.shape[0] == self.d_sae:
                    t = t.index_select(0, idx)
                state[name] = t.clone()
            for name in ("latent_mean", "latent_std"):
                if name in state:
                    sub.register_buffer(name, state[name])
            sub.load_state_dict(state, strict=True)
        sub.requires_grad_(False)
        sub.eval()
        # Steering reads a restricted copy on every hooked forward: its tensors become plain
        # attributes, so the encode formulas read them without nn.Module's attribute lookup
        # (about a third of a small encode's time on CPU). The copy is never trained, moved or saved.
        for store in (sub._parameters, sub._buffers):
            for name in list(store):
                tensor = store.pop(name)
                object.__setattr__(sub, name, tensor.detach() if tensor is not None else None)
        return sub

    # -- validation --------------------------------------------------------------------------
    def check_latents(self, idx: Any, field: str) -> None:
        """Raise InvalidArgument naming ``field`` unless every index is in [0, d_sae)."""
        for i in idx:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.d_sae:
                raise InvalidArgument(f"latent index {i!r} out of range [0, {self.d_sae})", field=field)


SAE_REGISTRY: dict[str, type[Sae]] = {}


def register(cls: type[Sae]) -> type[Sae]:
    """Class decorator: make ``cls`` buildable from a config whose architecture is ``cls.architecture``."""
    SAE_REGISTRY[cls.architecture] = cls
    return cls


def build_sae(cfg: SaeConfig) -> Sae:
    """The one place that maps a config to a class."""
    try:
        cls = SAE_REGISTRY[cfg.architecture]
    except KeyError:
        known = ", ".join(sorted(SAE_REGISTRY))
        raise NotFound(f"unknown SAE architecture {cfg.architecture!r} (known: {known})", field="architecture") from None
    return cls(cfg)
