"""ReLU-family SAEs where latent i depends only on encoder column i: standard, jumprelu, batchtopk.

All three share ``pre_acts`` = x' @ W_enc + b_enc, so the value of a few latents costs O(k * d_in).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_runtime.saes.base import Sae, SaeConfig, register


@register
class StandardSae(Sae):
    """f = relu(x' @ W_enc + b_enc)."""

    architecture = "standard"
    selective = True

    def pre_acts(self, x_n: Tensor, idx: Tensor | None = None) -> Tensor:
        """x' @ W_enc + b_enc, (..., d_sae), or (..., k) for the latent indices idx (k,)."""
        x = self.sae_input(x_n)
        if idx is None:
            return x @ self.W_enc + self.b_enc
        return x @ self.W_enc.index_select(1, idx) + self.b_enc.index_select(0, idx)

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x_n))

    def encode_selected_normalized(self, x_n: Tensor, idx: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x_n, idx))


@register
class JumpReluSae(StandardSae):
    """h = x' @ W_enc + b_enc; f = relu(h) * (h > threshold), per-latent threshold (d_sae,).

    The relu matters only for a negative threshold; it matches SAELens' inference JumpReLU.
    """

    architecture = "jumprelu"

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(self.threshold_shape(cfg), dtype=self.W_enc.dtype))

    @staticmethod
    def threshold_shape(cfg: SaeConfig) -> tuple[int, ...]:
        return (cfg.d_sae,)

    def thresholds(self, idx: Tensor | None = None) -> Tensor:
        """Thresholds broadcastable against pre-acts (all latents, or the indices idx)."""
        return self.threshold if idx is None else self.threshold.index_select(0, idx)

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        h = self.pre_acts(x_n)
        return torch.relu(h) * (h > self.thresholds())

    def encode_selected_normalized(self, x_n: Tensor, idx: Tensor) -> Tensor:
        h = self.pre_acts(x_n, idx)
        return torch.relu(h) * (h > self.thresholds(idx))


@register
class BatchTopKSae(JumpReluSae):
    """BatchTopK / Matryoshka BatchTopK at inference: JumpReLU with one global scalar ``threshold``.

    Stored as a 0-d ``threshold`` tensor. ``cfg.k`` (the training-time batch k) is kept for
    information only. SAELens saves these SAEs as ``jumprelu`` with the threshold broadcast.
    """

    architecture = "batchtopk"

    @staticmethod
    def threshold_shape(cfg: SaeConfig) -> tuple[int, ...]:
        return ()

    def thresholds(self, idx: Tensor | None = None) -> Tensor:
        return self.threshold
