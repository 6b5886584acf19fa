"""G-SAE: top-k on pre-activations followed by a sigmoid, on a per-token standardised input.

x_n = (x - mean(x)) / sqrt(var(x) + 1e-5) over d_in (a layer norm with no affine parameters);
h = x_n' @ W_enc + b_enc; keep the k largest h per position and map them through a sigmoid, so
latents lie in (0, 1). Decoding de-standardises with the Norm returned by :meth:`normalize`.
The first ``cfg.n_concepts`` latents are the labelled (supervised) concepts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.saes.base import Norm, Sae, SaeConfig, register
from sae_runtime.saes.topk import check_k, keep_topk

STANDARDISE_EPS = 1e-5


@register
class TopKSigmoidSae(Sae):
    """f = scatter(topk indices of h, sigmoid(top values)); always standardises its input."""

    architecture = "topk-sigmoid"
    selective = False

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__(cfg)
        self.k = check_k(cfg)
        if not 0 <= cfg.n_concepts <= cfg.d_sae:
            raise InvalidArgument(f"n_concepts must be in [0, {cfg.d_sae}], got {cfg.n_concepts}", field="n_concepts")

    def normalize(self, x: Tensor) -> tuple[Tensor, Norm | None]:
        mean = x.mean(dim=-1, keepdim=True)
        std = (x - mean).pow(2).mean(dim=-1, keepdim=True).add(STANDARDISE_EPS).sqrt()
        return (x - mean) / std, Norm(scale=std, shift=mean)

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        h = self.sae_input(x_n) @ self.W_enc + self.b_enc
        values, indices = keep_topk(h, self.k)
        return torch.zeros_like(h).scatter_(-1, indices, torch.sigmoid(values))
