"""SpaDE: sparsemax over scaled negative squared distances to prototypes.

f = sparsemax(-lambda * ||x' - W_enc[:, i]||^2 over i), lambda = softplus(lambda_raw). The encoder
columns are the prototypes; there is no encoder bias. Latents are non-negative and sum to 1 per
position. Membership depends on all latents, so selective encoding is a full encode plus a gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_runtime.saes.base import Sae, SaeConfig, register


def sparsemax(z: Tensor) -> Tensor:
    """Euclidean projection of each row of z (..., n) onto the probability simplex (Martins & Astudillo 2016)."""
    z_sorted, _ = z.sort(dim=-1, descending=True)
    cumsum = z_sorted.cumsum(dim=-1)
    ranks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    in_support = 1 + ranks * z_sorted > cumsum
    support = in_support.sum(dim=-1, keepdim=True)  # >= 1 always: the largest entry is in the support
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return torch.clamp(z - tau, min=0)


@register
class SpadeSae(Sae):
    """Parameters W_enc (d_in, d_sae) prototypes, lambda_raw (scalar), W_dec, b_dec; no b_enc."""

    architecture = "spade"
    selective = False

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__(cfg)
        del self.b_enc
        self.lambda_raw = nn.Parameter(torch.zeros((), dtype=self.W_enc.dtype))

    def scale(self) -> Tensor:
        """lambda = softplus(lambda_raw) > 0."""
        return F.softplus(self.lambda_raw)

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        x = self.sae_input(x_n)
        sq_dist = x.pow(2).sum(-1, keepdim=True) - 2 * (x @ self.W_enc) + self.W_enc.pow(2).sum(0)
        return sparsemax(-self.scale() * sq_dist.clamp_min(0))
