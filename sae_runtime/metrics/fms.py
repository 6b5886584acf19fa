"""Feature Monosemanticity Score (Härle et al., arXiv 2506.19382; reference ``utils/tree_loader.py``,
``eval/FMS_*.py``), with scikit-learn gini decision trees, in-sample as the reference.

Per concept c with binary labels y over samples with latent features z (N, K):

- ``acc_0``: accuracy of the tree truncated at its root split (the best single latent);
- global: one fully grown tree; Acc_d = accuracy of the tree truncated at depth d (nodes at depth d
  predict their majority class, shallower leaves are pure and count as correct);
  FMS_global = 1 - mean_{d>=2} (Acc_d - Acc_1) (1 when the tree has depth 1);
- local: p times, zero the latest root feature in every sample and refit a depth-3 tree;
  acc_p = its root-split accuracy; FMS_local@p = 2 (acc_0 - acc_p);
- FMS@p = acc_0 (FMS_local@p + FMS_global) / 2; the reported FMS@p averages concepts.

No clipping (as the reference notebook; the toy ``FMS_Tree_SVM.py`` clips to [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

LOCAL_DEPTH = 3
SEED = 42


def depth_accuracies(tree) -> list[float]:
    """Accuracy of a fitted sklearn tree truncated at depth 1, 2, ..., its depth (read from node counts)."""
    t = tree.tree_
    n_total = float(t.n_node_samples[0])
    depth = np.zeros(t.node_count, dtype=int)
    stack = [0]
    while stack:
        node = stack.pop()
        for child in (t.children_left[node], t.children_right[node]):
            if child != -1:
                depth[child] = depth[node] + 1
                stack.append(child)
    # majority count of each node; sklearn >= 1.4 stores class fractions in ``value``
    frac = t.value[:, 0, :]
    majority = frac.max(-1) / frac.sum(-1) * t.n_node_samples
    leaf = t.children_left == -1
    max_depth = int(depth.max())
    accs = []
    for d in range(1, max(max_depth, 1) + 1):
        take = (depth == d) | (leaf & (depth < d))
        accs.append(float(majority[take].sum() / n_total))
    return accs


def _tree(z: np.ndarray, y: np.ndarray, max_depth: int | None):
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(criterion="gini", max_depth=max_depth, random_state=0).fit(z, y)


@dataclass(frozen=True)
class ConceptFms:
    concept: str
    n: int
    acc_0: float
    fms_global: float
    acc_cuts: tuple[float, ...]  # acc_p for p = 1..cuts
    root_features: tuple[int, ...]  # the root latent of each refit, p = 0..cuts-1

    def local(self, p: int) -> float:
        return 2 * (self.acc_0 - self.acc_cuts[p - 1])

    def fms(self, p: int) -> float:
        return self.acc_0 * (self.local(p) + self.fms_global) / 2


def concept_fms(z: Tensor | np.ndarray, y: Tensor | np.ndarray, concept: str = "", cuts: int = 5) -> ConceptFms:
    """FMS parts of one concept: features z (N, K), binary labels y (N,)."""
    z = np.asarray(z.detach().cpu().double() if isinstance(z, Tensor) else z, dtype=np.float64)
    y = np.asarray(y.cpu() if isinstance(y, Tensor) else y).astype(int)
    full = _tree(z, y, None)
    accs = depth_accuracies(full)
    acc_0 = accs[0]
    fms_global = 1.0 - (float(np.mean([a - acc_0 for a in accs[1:]])) if len(accs) > 1 else 0.0)
    zc = z.copy()
    roots, acc_cuts = [], []
    root = int(full.tree_.feature[0])
    for _ in range(cuts):
        if root >= 0:
            zc[:, root] = 0.0
        roots.append(root)
        t = _tree(zc, y, LOCAL_DEPTH)
        acc_cuts.append(depth_accuracies(t)[0])
        root = int(t.tree_.feature[0])
    return ConceptFms(concept, int(len(y)), acc_0, fms_global, tuple(acc_cuts), tuple(roots))


def balanced_rows(y: Tensor, max_per_class: int | None = None, seed: int = SEED) -> Tensor:
    """Indices of all positives (at most ``max_per_class``) and as many negatives, seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.nonzero(y.bool()).flatten()
    neg = torch.nonzero(~y.bool()).flatten()
    pos = pos[torch.randperm(len(pos), generator=g)]
    neg = neg[torch.randperm(len(neg), generator=g)]
    n = min(len(pos), len(neg), max_per_class or len(pos))
    return torch.cat([pos[:n], neg[:n]])


@dataclass(frozen=True)
class FmsReport:
    fms_at_1: float
    fms_at_5: float
    per_concept: tuple[ConceptFms, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "fms_at_1": self.fms_at_1,
            "fms_at_5": self.fms_at_5,
            "per_concept": {
                c.concept: {"acc_0": c.acc_0, "fms_global": c.fms_global, "fms_local_at_1": c.local(1), "fms_local_at_5": c.local(5),
                            "fms_at_1": c.fms(1), "fms_at_5": c.fms(5), "root_latent": c.root_features[0], "n": c.n}
                for c in self.per_concept
            },
        }  # fmt: skip


def fms(latents: Tensor, concept_labels: Mapping[str, Tensor], *, max_per_class: int = 400, min_per_class: int = 10) -> FmsReport:
    """FMS@1 and FMS@5 over concepts: latents (N, K) per token, labels concept -> (N,) bool.

    Token-level samples with negatives subsampled to the positives' count (the reference's PII
    setting), at most ``max_per_class`` each; concepts with fewer than ``min_per_class`` positives
    are skipped.
    """
    parts = []
    for concept, y in sorted(concept_labels.items()):
        if int(y.sum()) < min_per_class:
            continue
        rows = balanced_rows(y, max_per_class)
        parts.append(concept_fms(latents[rows], y[rows], concept))
    if not parts:
        return FmsReport(math.nan, math.nan)
    return FmsReport(
        fms_at_1=float(np.mean([c.fms(1) for c in parts])),
        fms_at_5=float(np.mean([c.fms(5) for c in parts])),
        per_concept=tuple(parts),
    )


__all__: Sequence[str] = ("ConceptFms", "FmsReport", "balanced_rows", "concept_fms", "depth_accuracies", "fms")
