"""Feature absorption, SAEBench's probe-projection version (``feature_absorption_calculator.py``).

A *parent* concept (SAEBench: "starts with L"; here e.g. "is an animal word") has children (the
words). The dictionary's main latents for the parent are found by k-sparse probing; on a test
token where the ground-truth probe detects the parent, the parent direction p̂ should be carried
by those main latents. Absorption is when other latents (typically the child's own) carry it.

Per evaluated token, with x its activation (the dictionary's target), a its latents, D_i the
decoder row of latent i in activation space, c_i = cos(p̂, D_i), proj_i = a_i (D_i . p̂) (the
contribution of latent i along p̂; SAEBench's a_i c_i for unit-norm rows), P = x . p̂ and
M = sum_{i in main} proj_i:

- absorption fraction: candidates {i not main : c_i >= 0.1, proj_i > 0}, S = the sum of their top 3
  proj_i; 0 if M >= P or S / P < 0.4; 1 if M <= 0; else A / (A + M) with A = min(S, P - M), clipped to [0, 1];
- full absorption: every main activation < 1e-8, the top latent by proj_i has c >= 0.025, P >= 0 and
  proj_top / P >= 0.4.

Per parent: both averaged over the probe's true positives; the scores average the parents whose
probe F1 > 0.6. The ground-truth probe is a logistic regression on x (scikit-learn, balanced
classes); F1 at logit > 0.5 and true positives at logit > 0, as SAEBench. k-sparse probing: an L1
probe on the standardised latents (FISTA, ``training.logistic``) ranks latents by signed weight; for
k = 1..10 a balanced logistic regression on the top-k latents; the main latents are the k before
test F1 stops rising by more than 0.03.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from sae_runtime.training.logistic import fit_sparse_logistic

MIN_PROBE_F1 = 0.6
F1_JUMP = 0.03
MAX_K = 10
L1 = 0.01


@dataclass(frozen=True)
class TokenAbsorption:
    fraction: float
    full: bool


def token_absorption(x: Tensor, a: Tensor, decoder: Tensor, probe_dir: Tensor, main: list[int], scale: float = 1.0) -> TokenAbsorption:
    """Absorption of one token: activation x (d,), latents a (K,), decoder rows (K, d) in activation
    space, probe direction (d,), main latent indices; ``scale`` multiplies decoder contributions
    (a normalising dictionary's per-token scale)."""
    p_hat = probe_dir.double() / probe_dir.double().norm()
    dec = decoder.double()
    dots = dec @ p_hat
    cos = dots / dec.norm(dim=-1).clamp_min(1e-30)
    proj = a.double() * dots * scale
    big_p = float(x.double() @ p_hat)
    main_t = torch.tensor(main, dtype=torch.long)
    m = float(proj[main_t].sum()) if main else 0.0
    not_main = torch.ones_like(proj, dtype=torch.bool)
    not_main[main_t] = False
    cand = proj[not_main & (cos >= 0.1) & (proj > 0)]
    s = float(cand.topk(min(3, cand.numel())).values.sum()) if cand.numel() else 0.0
    if m >= big_p or (s / big_p if big_p != 0 else 0.0) < 0.4:
        frac = 0.0
    elif m <= 0:
        frac = 1.0
    else:
        absorbed = min(s, big_p - m)
        frac = min(max(absorbed / (absorbed + m), 0.0), 1.0)
    top = int(proj.argmax())
    mains_silent = bool((a.double()[main_t] < 1e-8).all()) if main else True
    # SAEBench: P >= 0 and proj_top / P >= 0.4; P == 0 cannot satisfy the ratio.
    full = mains_silent and float(cos[top]) >= 0.025 and big_p > 0 and float(proj[top]) / big_p >= 0.4
    return TokenAbsorption(frac, full)


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & y).sum())
    return 2 * tp / max(float(pred.sum() + y.sum()), 1.0)


def _balanced_logreg(z: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(class_weight="balanced", max_iter=500).fit(z, y)


def main_latents(a_train: Tensor, y_train: Tensor, a_test: Tensor, y_test: Tensor) -> tuple[list[int], list[float]]:
    """SAEBench's k-sparse probing: (main latents, test F1 for k = 1.. as far as it went)."""
    mu, sd = a_train.double().mean(0), a_train.double().std(0).clamp_min(1e-8)
    fit = fit_sparse_logistic((a_train.double() - mu) / sd, y_train.double(), L1, max_iter=500)
    order = torch.argsort(fit.coef.double(), descending=True).tolist()
    ytr, yte = y_train.numpy().astype(bool), y_test.numpy().astype(bool)
    best: list[int] = []
    f1s: list[float] = []
    prev = -1.0
    for k in range(1, MAX_K + 1):
        feats = order[:k]
        clf = _balanced_logreg(a_train[:, feats].double().numpy(), ytr)
        f1 = _f1(clf.predict(a_test[:, feats].double().numpy()).astype(bool), yte)
        f1s.append(f1)
        if f1 <= prev + F1_JUMP:
            break
        best, prev = feats, f1
    return best, f1s


@dataclass(frozen=True)
class ParentAbsorption:
    parent: str
    probe_f1: float
    n_true_positives: int
    main_latents: tuple[int, ...]
    mean_absorption_fraction: float
    full_absorption_rate: float


@dataclass(frozen=True)
class AbsorptionReport:
    absorption_fraction: float  # mean over parents with probe F1 > MIN_PROBE_F1
    full_absorption_rate: float
    per_parent: tuple[ParentAbsorption, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "absorption_fraction": self.absorption_fraction,
            "full_absorption_rate": self.full_absorption_rate,
            "per_parent": {p.parent: {k: v for k, v in asdict(p).items() if k != "parent"} for p in self.per_parent},
        }


def absorption(
    x: Tensor,
    latents: Tensor,
    decoder: Tensor,
    parents: Mapping[str, Tensor],
    *,
    scales: Tensor | None = None,
    test_fraction: float = 0.2,
    seed: int = 42,
    max_train: int = 4000,
) -> AbsorptionReport:
    """Absorption for each parent concept: x (N, d) activations (the dictionary's target), latents
    (N, K), decoder rows (K, d) in activation space, parents name -> (N,) bool labels; ``scales``
    (N,) per-token decoder scale of a normalising dictionary (None = 1)."""
    from sklearn.linear_model import LogisticRegression

    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = max(1, int(n * test_fraction))
    test, train = perm[:n_test], perm[n_test:][:max_train]
    parts = []
    for name, y in sorted(parents.items()):
        y = y.bool()
        if int(y[train].sum()) < 5 or int(y[test].sum()) < 5:
            continue
        probe = LogisticRegression(class_weight="balanced", max_iter=1000).fit(x[train].double().numpy(), y[train].numpy())
        logits = probe.decision_function(x[test].double().numpy())
        f1 = _f1(logits > 0.5, y[test].numpy())
        direction = torch.from_numpy(probe.coef_[0]).double()
        main, _ = main_latents(latents[train], y[train], latents[test], y[test])
        tp = [int(test[j]) for j in range(n_test) if bool(y[test][j]) and logits[j] > 0]
        results = [
            token_absorption(x[i], latents[i], decoder, direction, main, 1.0 if scales is None else float(scales[i])) for i in tp
        ]
        parts.append(ParentAbsorption(
            parent=name, probe_f1=f1, n_true_positives=len(tp), main_latents=tuple(main),
            mean_absorption_fraction=sum(r.fraction for r in results) / max(len(tp), 1),
            full_absorption_rate=sum(r.full for r in results) / max(len(tp), 1),
        ))  # fmt: skip
    kept = [p for p in parts if p.probe_f1 > MIN_PROBE_F1]
    return AbsorptionReport(
        absorption_fraction=float(np.mean([p.mean_absorption_fraction for p in kept])) if kept else math.nan,
        full_absorption_rate=float(np.mean([p.full_absorption_rate for p in kept])) if kept else math.nan,
        per_parent=tuple(parts),
    )
