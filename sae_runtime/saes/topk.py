"""TopK SAE (Gao et al. 2024; SAELens, sparsify, dictionary_learning AutoEncoderTopK, OpenAI-style).

f = keep the k largest of relu(x' @ W_enc + b_enc) per position, zero the rest. Which latents survive
depends on all of them, so selective encoding is a full encode plus a gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.saes.base import Sae, SaeConfig, register


def check_k(cfg: SaeConfig) -> int:
    """cfg.k as an int in [1, d_sae]; InvalidArgument naming ``k`` otherwise."""
    k = cfg.k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.d_sae:
        raise InvalidArgument(f"{cfg.architecture} needs k in [1, d_sae={cfg.d_sae}], got {k!r}", field="k")
    return k


def keep_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(top values (..., k), their indices (..., k)) along the last dim."""
    top = values.topk(k, dim=-1, sorted=False)
    return top.values, top.indices


@register
class TopKSae(Sae):
    """Top-k of relu(pre-acts).

    With SAELens' ``rescale_acts_by_decoder_norm`` the pre-acts are multiplied by ||W_dec[i]||
    before the top-k, and latents divided by it before decode; that division is folded into
    :meth:`decoder_rows` so ``decode_normalized(f) == f @ decoder_rows() + b_dec`` still holds.
    """

    architecture = "topk"
    selective = False

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__(cfg)
        self.k = check_k(cfg)

    def decoder_norms(self) -> Tensor:
        """||W_dec[i]|| (d_sae,)."""
        return self.W_dec.norm(dim=-1)

    def pre_acts(self, x_n: Tensor) -> Tensor:
        h = self.sae_input(x_n) @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            h = h * self.decoder_norms()
        return h

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        h = self.pre_acts(x_n)
        values, indices = keep_topk(h, self.k)
        return torch.zeros_like(h).scatter_(-1, indices, torch.relu(values))

    def decoder_rows(self, idx: Tensor | None = None) -> Tensor:
        rows = self.W_dec if idx is None else self.W_dec.index_select(0, idx)
        if not self.cfg.rescale_acts_by_decoder_norm:
            return rows
        # A zero row stays zero (its latent is always 0 too), instead of becoming NaN.
        norms = rows.norm(dim=-1, keepdim=True)
        return rows / norms.clamp_min(torch.finfo(rows.dtype).tiny)
