"""Pooled SAE latents, the risk probe's inputs (:mod:`sae_runtime.risk`): per SAE and sequence,
the mean and the max of every latent over the prompt positions and over the generated ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

POOLS = ("prompt_mean", "prompt_max", "gen_mean", "gen_max")
PROMPT_POOLS = POOLS[:2]

__all__ = ["POOLS", "PROMPT_POOLS", "PooledStats", "pool_latents", "pool_masked", "stack_pooled"]


@dataclass(frozen=True)
class PooledStats:
    """Pooled latents of one SAE for one sequence (each (d_sae,)) or a batch (each (B, d_sae)).

    ``gen_mean``/``gen_max`` are None before generation; empty pools count as zeros.
    """

    prompt_mean: Tensor
    prompt_max: Tensor
    gen_mean: Tensor | None = None
    gen_max: Tensor | None = None

    def get(self, pool: str) -> Tensor | None:
        return getattr(self, pool)


def _masked_mean_max(latents: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max over positions where mask is True. latents (..., T, d), mask (..., T)."""
    m = mask.to(latents.dtype).unsqueeze(-1)
    count = m.sum(-2)
    mean = (latents * m).sum(-2) / count.clamp_min(1.0)
    neg_inf = torch.tensor(float("-inf"), dtype=latents.dtype, device=latents.device)
    mx = torch.where(mask.unsqueeze(-1), latents, neg_inf).amax(-2)
    mx = torch.where(count > 0, mx, torch.zeros_like(mx))
    return mean, mx


def pool_masked(latents: Tensor, prompt_mask: Tensor, gen_mask: Tensor | None = None) -> PooledStats:
    """Pool latents (..., T, d_sae) over the positions of each mask (..., T) (bool; padding False)."""
    pm, px = _masked_mean_max(latents, prompt_mask.bool())
    if gen_mask is None:
        return PooledStats(pm, px)
    gm, gx = _masked_mean_max(latents, gen_mask.bool())
    return PooledStats(pm, px, gm, gx)


def pool_latents(latents: Tensor, n_prompt: int) -> PooledStats:
    """Pool one sequence's latents (T, d_sae) whose first ``n_prompt`` positions are the prompt.

    Positions after the prompt are the generated ones (an empty generated pool gives zeros).
    """
    t = latents.shape[-2]
    pos = torch.arange(t, device=latents.device)
    return pool_masked(latents, pos < n_prompt, pos >= n_prompt)


def stack_pooled(rows: Sequence[Mapping[str, PooledStats]]) -> dict[str, PooledStats]:
    """Stack per-sequence pooled stats (tensors (d_sae,)) into one batch (tensors (N, d_sae))."""
    out: dict[str, PooledStats] = {}
    for name in rows[0]:
        stats = [r[name] for r in rows]
        cols = {}
        for pool in POOLS:
            vals = [s.get(pool) for s in stats]
            cols[pool] = None if any(v is None for v in vals) else torch.stack(vals)
        out[name] = PooledStats(**cols)
    return out
