"""Gated SAE (Rajamanoharan et al. 2024), SAELens parameter names.

gate = (x' @ W_enc + b_gate) > 0; mag = relu(x' @ (W_enc * exp(r_mag)) + b_mag); f = gate * mag.
Latent i depends only on column i of W_enc, so selective encoding costs O(k * d_in).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_runtime.saes.base import Sae, SaeConfig, register


@register
class GatedSae(Sae):
    """Parameters W_enc (d_in, d_sae), b_gate, b_mag, r_mag (d_sae,), W_dec, b_dec; no b_enc."""

    architecture = "gated"
    selective = True

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__(cfg)
        del self.b_enc
        dtype = self.W_enc.dtype
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    def _encode(self, x_n: Tensor, idx: Tensor | None) -> Tensor:
        x = self.sae_input(x_n)
        if idx is None:
            w, b_gate, b_mag, r_mag = self.W_enc, self.b_gate, self.b_mag, self.r_mag
        else:
            w = self.W_enc.index_select(1, idx)
            b_gate, b_mag, r_mag = (p.index_select(0, idx) for p in (self.b_gate, self.b_mag, self.r_mag))
        h = x @ w
        gate = (h + b_gate) > 0
        mag = torch.relu(h * r_mag.exp() + b_mag)
        return mag * gate

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        return self._encode(x_n, None)

    def encode_selected_normalized(self, x_n: Tensor, idx: Tensor) -> Tensor:
        return self._encode(x_n, idx)
