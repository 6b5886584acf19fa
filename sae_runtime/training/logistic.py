"""Metrics and a sparse logistic regression in plain torch (no sklearn), used by the risk probe.

- :func:`fit_sparse_logistic`: L1-regularised logistic regression by FISTA; exact zeros.
- :func:`auroc`: rank-based area under the ROC curve, ties counted one half.
- :func:`stratified_split`: seeded train/test indices keeping both classes on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument


@dataclass(frozen=True)
class LogisticFit:
    coef: Tensor  # (F,) on standardised features
    intercept: float
    n_iter: int
    converged: bool


def _soft_threshold(v: Tensor, t: float) -> Tensor:
    return torch.sign(v) * torch.clamp(v.abs() - t, min=0.0)


def _spectral_norm_sq(x: Tensor, iters: int = 100) -> float:
    """Largest eigenvalue of x^T x by power iteration (x (n, F), with an all-ones column added)."""
    v = torch.ones(x.shape[1] + 1, dtype=x.dtype) / math.sqrt(x.shape[1] + 1)
    lam = 0.0
    for _ in range(iters):
        w = x @ v[:-1] + v[-1]
        u = torch.cat([x.T @ w, w.sum().reshape(1)])
        lam = float(u.norm())
        if lam == 0.0:
            return 1.0
        v = u / lam
    return lam


def fit_sparse_logistic(
    z: Tensor,
    y: Tensor,
    l1: float,
    *,
    sample_weight: Tensor | None = None,
    max_iter: int = 3000,
    tol: float = 1e-7,
) -> LogisticFit:
    """Minimise mean_i w_i * logloss(y_i, b + z_i . beta) + l1 * ||beta||_1 by FISTA (proximal
    gradient with momentum); the intercept b is not penalised. Soft-thresholding makes
    coefficients exactly zero. z (n, F) standardised features, y (n,) in {0, 1}; float64 inside.
    """
    z = z.double()
    y = y.double()
    n = z.shape[0]
    w = torch.ones(n, dtype=torch.float64) if sample_weight is None else sample_weight.double()
    w = w * (n / w.sum())
    # The logistic loss has curvature <= 1/4: L = max(w) * ||[z 1]||^2 / (4n) bounds the gradient's Lipschitz constant.
    lip = float(w.max()) * _spectral_norm_sq(z) / (4.0 * n)
    step = 1.0 / max(lip, 1e-12)
    beta = torch.zeros(z.shape[1], dtype=torch.float64)
    p0 = min(max(float((w * y).sum() / w.sum()), 1e-6), 1 - 1e-6)
    b = math.log(p0 / (1 - p0))
    beta_m, b_m, t = beta.clone(), b, 1.0
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        r = w * (torch.sigmoid(z @ beta_m + b_m) - y) / n
        beta_new = _soft_threshold(beta_m - step * (z.T @ r), step * l1)
        b_new = b_m - step * float(r.sum())
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        mom = (t - 1) / t_new
        delta = max(float((beta_new - beta).abs().amax()) if beta.numel() else 0.0, abs(b_new - b))
        beta_m = beta_new + mom * (beta_new - beta)
        b_m = b_new + mom * (b_new - b)
        beta, b, t = beta_new, b_new, t_new
        if delta < tol:
            converged = True
            break
    return LogisticFit(coef=beta.float(), intercept=float(b), n_iter=it, converged=converged)


# -- AUROC -----------------------------------------------------------------------------------
def _average_ranks(s: Tensor) -> Tensor:
    """1-based ranks of s (n,), tied values sharing their average rank."""
    order = torch.argsort(s, stable=True)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def auroc(scores: Sequence[float] | Tensor, labels: Sequence[int] | Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); ties count one half.

    Raises InvalidArgument when a class is missing, lengths differ or a score is NaN.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    if s.shape != y.shape:
        raise InvalidArgument(f"{s.numel()} scores for {y.numel()} labels", field="labels")
    if torch.isnan(s).any():
        raise InvalidArgument("scores contain NaN", field="scores")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InvalidArgument("AUROC needs both positive and negative labels", field="labels")
    ranks = _average_ranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def stratified_split(labels: Tensor, test_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, test) with about ``test_fraction`` of each class in test (>= 1 each)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in (0, 1):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = max(1, round(idx.numel() * test_fraction)) if idx.numel() > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
