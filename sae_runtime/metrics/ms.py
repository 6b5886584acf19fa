"""Monosemanticity Score (Pach et al., arXiv 2504.02821; reference code ``metric.py``).

For latent k with activations a_n over N inputs and embeddings e_n of the inputs from a separate
encoder: ã = min-max normalised a (no epsilon), s_nm = cos(e_n, e_m), and

    MS_k = sum_{n<m} ã_n ã_m s_nm / sum_{n<m} ã_n ã_m

(self-pairs excluded). With ê_n = e_n / ||e_n|| the sums have an exact O(N) form:

    numerator   = (||sum_n ã_n ê_n||^2 - sum_n ã_n^2) / 2
    denominator = ((sum_n ã_n)^2 - sum_n ã_n^2) / 2

A constant latent (dead, say), or one with a single input off its minimum, gives 0/0: NaN, which the summary counts as dead and leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def monosemanticity(acts: Tensor, emb: Tensor, chunk: int = 4096) -> Tensor:
    """MS per latent (K,) float64 for activations (N, K) and input embeddings (N, E).

    O(N * K * E) time, O(K * E) memory: the rows are folded in chunks.
    """
    if acts.dim() != 2 or emb.dim() != 2 or acts.shape[0] != emb.shape[0]:
        raise ValueError(f"acts (N, K) and emb (N, E) must share N, got {tuple(acts.shape)} and {tuple(emb.shape)}")
    a = acts.double()
    lo, hi = a.min(0).values, a.max(0).values
    e_hat = emb.double() / emb.double().norm(dim=-1, keepdim=True)
    weighted = torch.zeros(a.shape[1], emb.shape[1], dtype=torch.float64)  # sum_n ã_n ê_n
    s1 = torch.zeros(a.shape[1], dtype=torch.float64)  # sum_n ã_n
    s2 = torch.zeros(a.shape[1], dtype=torch.float64)  # sum_n ã_n^2
    for i in range(0, a.shape[0], chunk):
        t = (a[i : i + chunk] - lo) / (hi - lo)  # 0/0 = NaN for constant latents, as the reference
        weighted += t.T @ e_hat[i : i + chunk]
        s1 += t.sum(0)
        s2 += t.pow(2).sum(0)
    num = (weighted.pow(2).sum(-1) - s2) / 2
    den = (s1.pow(2) - s2) / 2
    # den is 0 exactly when at most one input has weight (0/0 in the pairwise sum); the O(N) form
    # leaves rounding noise there, which must not become +-inf.
    ms = num / den
    return torch.where(den > 1e-9 * s1.pow(2), ms, torch.full_like(ms, math.nan))


@dataclass(frozen=True)
class MsSummary:
    mean: float  # over non-NaN latents
    std: float
    n_scored: int
    n_dead: int  # NaN: constant latents (or a single firing input: 0 weight off the diagonal)


def summarise(ms: Tensor) -> MsSummary:
    ok = ms[~torch.isnan(ms)]
    n = int(ok.numel())
    return MsSummary(
        mean=float(ok.mean()) if n else math.nan,
        std=float(ok.std(unbiased=False)) if n else math.nan,
        n_scored=n,
        n_dead=int(ms.numel()) - n,
    )
