"""Standard ReLU SAE and JumpReLU: latent i depends only on encoder column i."""

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
    """h = x' @ W_enc + b_enc; f = h * (h > threshold), per-latent threshold (d_sae,)."""

    architecture = "jumprelu"

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.W_enc.dtype))

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        h = self.pre_acts(x_n)
        return h * (h > self.threshold)

    def encode_selected_normalized(self, x_n: Tensor, idx: Tensor) -> Tensor:
        h = self.pre_acts(x_n, idx)
        return h * (h > self.threshold.index_select(0, idx))
