"""G-SAE training (Härle et al., arXiv 2506.19382; reference ``train/determined_trails.py``).

The model is the served :class:`~sae_runtime.saes.gsae.TopKSigmoidSae`, trained in place:

- per-token standardisation x_n = (x - mean_d x) / std_d x (no affine parameters), inside the SAE;
- h = (x_n - b_dec) W_enc + b_enc; f = sigmoid of the top-k of the *raw* h, zero elsewhere;
- x_hat = (f W_dec + b_dec) std + mean;
- loss = NMSE + cond_coeff * L_cond with NMSE = mean_d (x_hat - x)^2 / mean_d x^2 per token and
  L_cond = sum_{c < C} BCE(sigmoid(h_c), y_c): the first C latents are the C labelled concepts,
  supervised on the pre-activations before top-k (so whether or not they made the top k);
- "tied" initialisation only: W_dec starts as W_enc^T, the two are separate parameters after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.saes import SaeConfig, build_sae
from sae_runtime.saes.gsae import TopKSigmoidSae
from sae_runtime.saes.topk import keep_topk


@dataclass(frozen=True)
class GsaeTrainConfig:
    d_sae: int = 512
    k: int = 12
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 1e-3
    cond_coeff: float = 1.0
    seed: int = 0
    log_every: int = 100


def gsae_losses(sae: TopKSigmoidSae, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(NMSE, L_cond) averaged over the rows of x (B, d_in) with concept labels y (B, C) in {0, 1}."""
    x_n, norm = sae.normalize(x)
    h = sae.sae_input(x_n) @ sae.W_enc + sae.b_enc
    values, idx = keep_topk(h, sae.k)
    f = torch.zeros_like(h).scatter(-1, idx, torch.sigmoid(values))
    x_hat = sae.decode(f, norm)
    nmse = ((x_hat - x).pow(2).mean(-1) / x.pow(2).mean(-1).clamp_min(1e-12)).mean()
    c = y.shape[-1]
    cond = F.binary_cross_entropy_with_logits(h[:, :c], y, reduction="none").sum(-1).mean() if c else h.new_zeros(())
    return nmse, cond


def train_gsae(
    x: Tensor, y: Tensor, concepts: Sequence[str], cfg: GsaeTrainConfig = GsaeTrainConfig(), *,
    hook_name: str | None = None, model_name: str | None = None,
) -> tuple[TopKSigmoidSae, list[dict[str, float]]]:
    """Train on rows x (N, d_in) with labels y (N, C) for ``concepts`` (C names, latent c = concept c).

    Returns the SAE (labels set: concept -> its reserved latent) and the logged losses.
    """
    if x.dim() != 2 or y.shape != (x.shape[0], len(concepts)):
        raise InvalidArgument(f"x (N, d_in) and y (N, {len(concepts)}) expected, got {tuple(x.shape)} and {tuple(y.shape)}", field="y")
    n, d = x.shape
    sae_cfg = SaeConfig(
        architecture="topk-sigmoid", d_in=d, d_sae=cfg.d_sae, k=cfg.k, n_concepts=len(concepts),
        hook_name=hook_name, model_name=model_name,
        metadata={"trained_architecture": "gsae", "training_steps": cfg.steps, "cond_coeff": cfg.cond_coeff, "concepts": list(concepts)},
    )  # fmt: skip
    sae = build_sae(sae_cfg)
    assert isinstance(sae, TopKSigmoidSae)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, cfg.d_sae, generator=g) / math.sqrt(d))
        sae.W_dec.copy_(sae.W_enc.T)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    x, y = x.float(), y.float()
    history: list[dict[str, float]] = []
    for step in range(cfg.steps):
        rows = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        nmse, cond = gsae_losses(sae, x[rows], y[rows])
        loss = nmse + cfg.cond_coeff * cond
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "nmse": float(nmse.detach()), "cond": float(cond.detach())})
    sae.requires_grad_(False)
    sae.labels.update({c: i for i, c in enumerate(concepts)})
    return sae.eval(), history
