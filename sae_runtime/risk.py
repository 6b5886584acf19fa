"""Hallucination-risk probe: a sparse logistic readout from pooled SAE latents (reference.md s.4).

Features of one sequence, per SAE: the mean and the max of every latent over the prompt positions,
and the mean and the max over the generated positions. They are standardised with the training
set's mean/std and fed to an L1-regularised logistic regression, so most coefficients are exactly
zero and the remaining ones name latents. Two heads are stored together:

- the *prompt* head reads the prompt pools only: it scores a request before anything is generated;
- the *final* head reads prompt and generated pools: it scores the finished completion.

Feature layout (``ProbeLayout``): ``[pool][sae][latent]`` flattened, pools in :data:`POOLS` order,
SAEs in layout order. The prompt features are therefore a prefix of the final features.

A score's contributions are ``coef * standardised feature`` summed over a latent's pools, so
``intercept + sum(contributions) == logit`` exactly when every contribution is returned.

Files (``save``/``load``): ``risk_probe.json`` (layout, latent labels, fit metadata) and
``risk_probe.safetensors`` (``feature_mean``, ``feature_std`` (4D,), ``prompt_coef`` (2D,),
``prompt_intercept`` (1,), ``final_coef`` (4D,), ``final_intercept`` (1,), float32; D = total
latents over SAEs). Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_runtime.backends.types import RiskContribution, RiskScore, label_of
from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.plan import EditOp, LatentEdit
from sae_runtime.risk_pooling import POOLS, PROMPT_POOLS, PooledStats, pool_latents, pool_masked, stack_pooled
from sae_runtime.training.logistic import auroc, fit_sparse_logistic, stratified_split

HEADS = ("prompt", "final")
PROBE_JSON = "risk_probe.json"
PROBE_TENSORS = "risk_probe.safetensors"
FORMAT_NAME = "sae_runtime.risk_probe"
FORMAT_VERSION = 1

__all__ = [
    "POOLS", "PROMPT_POOLS", "PooledStats", "ProbeLayout", "RiskProbe", "auroc", "mitigation_edits",
    "pool_latents", "pool_masked", "select_l1", "stack_pooled", "stratified_split",
]


# -- feature layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeLayout:
    """Which SAEs (name, d_sae) the probe reads, in feature order."""

    saes: tuple[tuple[str, int], ...]

    @property
    def n_latents(self) -> int:
        """D: latents over all SAEs."""
        return sum(d for _, d in self.saes)

    def n_features(self, head: str) -> int:
        return self.n_latents * (len(PROMPT_POOLS) if head == "prompt" else len(POOLS))

    def latent_owner(self, j: int) -> tuple[str, int]:
        """(sae name, latent index) of position j in [0, D)."""
        for name, d in self.saes:
            if j < d:
                return name, j
            j -= d
        raise IndexError(j)

    def latent_offset(self, sae: str) -> int:
        off = 0
        for name, d in self.saes:
            if name == sae:
                return off
            off += d
        raise KeyError(sae)

    def build(self, pooled: Mapping[str, PooledStats], head: str = "final", field: str = "pooled") -> Tensor:
        """Features (..., n_features(head)) in float32 from per-SAE pooled stats.

        Missing generated pools count as zeros. Raises InvalidArgument naming ``field`` for an
        absent SAE or a wrong shape.
        """
        if head not in HEADS:
            raise InvalidArgument(f"unknown head {head!r} (use {HEADS})", field="head")
        pools = PROMPT_POOLS if head == "prompt" else POOLS
        blocks: list[Tensor] = []
        for pool in pools:
            for name, d in self.saes:
                if name not in pooled:
                    raise InvalidArgument(f"no pooled latents for SAE {name!r}", field=f"{field}.{name}")
                stats = pooled[name]
                t = stats.get(pool)
                if t is None:
                    t = torch.zeros_like(stats.prompt_mean)
                if t.shape[-1] != d:
                    raise InvalidArgument(f"{pool} has {t.shape[-1]} latents, expected {d}", field=f"{field}.{name}.{pool}")
                blocks.append(t.detach().float().cpu())
        return torch.cat(blocks, dim=-1)


# -- the probe --------------------------------------------------------------------------------
@dataclass
class RiskProbe:
    """Two sparse logistic heads over standardised pooled-latent features (see module doc)."""

    layout: ProbeLayout
    feature_mean: Tensor  # (4D,)
    feature_std: Tensor  # (4D,), 1 where a feature was constant
    prompt_coef: Tensor  # (2D,)
    prompt_intercept: float
    final_coef: Tensor  # (4D,)
    final_intercept: float
    #: sae name -> {label: latent index}, used to name contributions.
    latent_labels: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Everything is held at the float32 precision it is saved with, so a loaded probe scores
        # bit-for-bit like the one that was saved.
        self.prompt_intercept = float(torch.tensor(self.prompt_intercept, dtype=torch.float32))
        self.final_intercept = float(torch.tensor(self.final_intercept, dtype=torch.float32))
        for name in ("feature_mean", "feature_std", "prompt_coef", "final_coef"):
            setattr(self, name, getattr(self, name).detach().float().cpu())

    # -- fitting --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        features: Tensor,
        labels: Tensor | Sequence[int],
        layout: ProbeLayout,
        *,
        l1: float = 0.02,
        l1_prompt: float | None = None,
        balanced: bool = True,
        max_iter: int = 3000,
        latent_labels: Mapping[str, Mapping[str, int]] | None = None,
    ) -> "RiskProbe":
        """Fit both heads. features (N, 4D) as built by ``layout.build(..., head="final")``,
        labels (N,) with 1 = hallucinated. ``balanced`` weights classes inversely to frequency.
        """
        x = features.detach().double().cpu()
        y = torch.as_tensor(labels).flatten().double()
        if x.dim() != 2 or x.shape[1] != layout.n_features("final"):
            raise InvalidArgument(f"features must be (N, {layout.n_features('final')}), got {tuple(x.shape)}", field="features")
        if x.shape[0] != y.numel():
            raise InvalidArgument(f"{x.shape[0]} rows for {y.numel()} labels", field="labels")
        if not bool(((y == 0) | (y == 1)).all()) or y.min() == y.max():
            raise InvalidArgument("labels must be 0/1 with both classes present", field="labels")
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        z = (x - mean) / std
        weight = None
        if balanced:
            pos = float(y.mean())
            weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
        n_prompt = layout.n_features("prompt")
        prompt = fit_sparse_logistic(z[:, :n_prompt], y, l1 if l1_prompt is None else l1_prompt, sample_weight=weight, max_iter=max_iter)
        final = fit_sparse_logistic(z, y, l1, sample_weight=weight, max_iter=max_iter)
        meta = {
            "n_train": int(y.numel()),
            "n_positive": int(y.sum()),
            "l1": l1,
            "l1_prompt": l1 if l1_prompt is None else l1_prompt,
            "balanced": balanced,
            "prompt_iterations": prompt.n_iter,
            "final_iterations": final.n_iter,
            "converged": prompt.converged and final.converged,
        }
        return cls(
            layout=layout,
            feature_mean=mean.float(),
            feature_std=std.float(),
            prompt_coef=prompt.coef,
            prompt_intercept=prompt.intercept,
            final_coef=final.coef,
            final_intercept=final.intercept,
            latent_labels={k: dict(v) for k, v in (latent_labels or {}).items()},
            meta=meta,
        )

    # -- scoring --------------------------------------------------------------------------
    def _head(self, head: str) -> tuple[Tensor, float, Tensor, Tensor]:
        if head == "prompt":
            n = self.layout.n_features("prompt")
            return self.prompt_coef, self.prompt_intercept, self.feature_mean[:n], self.feature_std[:n]
        if head == "final":
            return self.final_coef, self.final_intercept, self.feature_mean, self.feature_std
        raise InvalidArgument(f"unknown head {head!r} (use {HEADS})", field="head")

    def standardise(self, features: Tensor, head: str = "final") -> Tensor:
        _, _, mean, std = self._head(head)
        if features.shape[-1] != mean.numel():
            raise InvalidArgument(f"expected {mean.numel()} features, got {features.shape[-1]}", field="features")
        return (features.float().cpu() - mean) / std

    def logits(self, features: Tensor, head: str = "final") -> Tensor:
        """Logits (...,) of raw features (..., n_features(head))."""
        coef, b, _, _ = self._head(head)
        return self.standardise(features, head) @ coef + b

    def predict_proba(self, features: Tensor, head: str = "final") -> Tensor:
        return torch.sigmoid(self.logits(features, head))

    def score(self, pooled: Mapping[str, PooledStats], head: str = "final", top_n: int | None = 10) -> RiskScore:
        """Probability and per-latent contributions for ONE sequence (stats of shape (d_sae,)).

        Contributions are sorted by |value|, the ``top_n`` largest kept (None: every latent with a
        nonzero contribution).
        """
        return self.score_many([pooled], head, top_n)[0]

    def score_many(self, pooled: Sequence[Mapping[str, PooledStats]], head: str = "final", top_n: int | None = 10) -> list[RiskScore]:
        """:meth:`score` for several sequences in one vectorised pass (a batch's rows)."""
        if not pooled:
            return []
        rows = [self.layout.build(p, head) for p in pooled]
        if any(f.dim() != 1 for f in rows):
            raise InvalidArgument("score takes one sequence per entry; use predict_proba for batches", field="pooled")
        coef, b, _, _ = self._head(head)
        per_feature = coef * self.standardise(torch.stack(rows), head)  # (N, n_features)
        per_latent = per_feature.reshape(len(rows), -1, self.layout.n_latents).double().sum(1)  # (N, D)
        logits = b + per_latent.sum(1)
        # Stable sort by |contribution|, largest first: zeros sort last, ties keep latent order.
        order = torch.argsort(per_latent.abs(), dim=1, descending=True, stable=True)
        if top_n is not None:
            order = order[:, :top_n]
        # one conversion to Python numbers per tensor: indexing a tensor per element costs more
        # than the scoring itself for a step's few rows
        values = per_latent.gather(1, order).tolist()
        scores = []
        for latents_r, values_r, logit in zip(order.tolist(), values, logits.tolist()):
            contribs = []
            for j, value in zip(latents_r, values_r):
                if value == 0.0:
                    break
                sae, latent = self.layout.latent_owner(j)
                contribs.append(RiskContribution(sae=sae, latent=latent, label=label_of(self.latent_labels.get(sae, {}), latent), contribution=value))
            scores.append(RiskScore(probability=1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0, contributions=tuple(contribs)))
        return scores

    def score_prompt(self, pooled: Mapping[str, PooledStats], top_n: int | None = 10) -> RiskScore:
        """Score from the prompt pools alone (before generation, and the running score)."""
        return self.score(pooled, "prompt", top_n)

    def score_final(self, pooled: Mapping[str, PooledStats], top_n: int | None = 10) -> RiskScore:
        """Score from prompt and generated pools."""
        return self.score(pooled, "final", top_n)

    # -- mitigation -----------------------------------------------------------------------
    def latent_weights(self, head: str = "final") -> Tensor:
        """Per-latent risk weight (D,): the head's standardised coefficients summed over pools."""
        coef, _, _, _ = self._head(head)
        return coef.reshape(-1, self.layout.n_latents).sum(0)

    def top_risk_latents(self, n: int, head: str = "final") -> list[tuple[str, int]]:
        """The ``n`` latents with the largest positive risk weight (fewer if fewer are positive),
        as (sae name, latent index), most risky first; ties broken by feature order."""
        if n < 0:
            raise InvalidArgument("must be >= 0", field="mitigate_risk_top_n")
        w = self.latent_weights(head)
        pos = torch.nonzero(w > 0).flatten()
        order = pos[torch.argsort(w[pos], descending=True, stable=True)][:n]
        return [self.layout.latent_owner(j) for j in order.tolist()]

    # -- files ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write risk_probe.json + risk_probe.safetensors into ``directory`` (created)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            "feature_mean": self.feature_mean.float().contiguous(),
            "feature_std": self.feature_std.float().contiguous(),
            "prompt_coef": self.prompt_coef.float().contiguous(),
            "prompt_intercept": torch.tensor([self.prompt_intercept], dtype=torch.float32),
            "final_coef": self.final_coef.float().contiguous(),
            "final_intercept": torch.tensor([self.final_intercept], dtype=torch.float32),
        }
        save_file(tensors, str(d / PROBE_TENSORS))
        cfg = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pools": list(POOLS),
            "saes": [{"name": n, "d_sae": k} for n, k in self.layout.saes],
            "latent_labels": self.latent_labels,
            "meta": self.meta,
        }
        (d / PROBE_JSON).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "RiskProbe":
        """Read a probe written by :meth:`save`; FormatError names the file at fault."""
        d = Path(directory)
        cfg_path, t_path = d / PROBE_JSON, d / PROBE_TENSORS
        for p in (cfg_path, t_path):
            if not p.is_file():
                raise FormatError("missing risk probe file", field=str(p))
        try:
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("format") != FORMAT_NAME or cfg.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} file")
            if list(cfg.get("pools", [])) != list(POOLS):
                raise ValueError(f"pools must be {list(POOLS)}")
            layout = ProbeLayout(tuple((str(s["name"]), int(s["d_sae"])) for s in cfg["saes"]))
            labels = {str(k): {str(a): int(b) for a, b in v.items()} for k, v in cfg.get("latent_labels", {}).items()}
        except (ValueError, KeyError, TypeError) as err:
            raise FormatError(f"bad probe config: {err}", field=str(cfg_path)) from None
        try:
            t = load_file(str(t_path))
        except Exception as err:  # safetensors raises its own error types
            raise FormatError(f"unreadable safetensors: {err}", field=str(t_path)) from None
        shapes = {
            "feature_mean": layout.n_features("final"),
            "feature_std": layout.n_features("final"),
            "prompt_coef": layout.n_features("prompt"),
            "prompt_intercept": 1,
            "final_coef": layout.n_features("final"),
            "final_intercept": 1,
        }
        for key, n in shapes.items():
            if key not in t:
                raise FormatError(f"missing tensor {key!r}", field=str(t_path))
            if tuple(t[key].shape) != (n,):
                raise FormatError(f"tensor {key!r} has shape {tuple(t[key].shape)}, expected ({n},)", field=str(t_path))
            if not torch.isfinite(t[key]).all():
                raise FormatError(f"tensor {key!r} has non-finite values", field=str(t_path))
        return cls(
            layout=layout,
            feature_mean=t["feature_mean"].float(),
            feature_std=t["feature_std"].float(),
            prompt_coef=t["prompt_coef"].float(),
            prompt_intercept=float(t["prompt_intercept"][0]),
            final_coef=t["final_coef"].float(),
            final_intercept=float(t["final_intercept"][0]),
            latent_labels=labels,
            meta=dict(cfg.get("meta", {})),
        )


def mitigation_edits(probe: RiskProbe, n: int, head: str = "final") -> tuple[LatentEdit, ...]:
    """Ablate exactly the probe's ``n`` most risk-positive latents: one ABLATE edit per SAE, in
    layout order, latents most risky first."""
    by_sae: dict[str, list[int]] = {}
    for sae, latent in probe.top_risk_latents(n, head):
        by_sae.setdefault(sae, []).append(latent)
    return tuple(
        LatentEdit(sae=name, op=EditOp.ABLATE, latents=tuple(by_sae[name])) for name, _ in probe.layout.saes if name in by_sae
    )


def select_l1(
    features: Tensor,
    labels: Tensor,
    layout: ProbeLayout,
    grid: Sequence[float] = (0.003, 0.01, 0.02, 0.05, 0.1),
    *,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """Pick the L1 strength with the best final-head AUROC on a held-out part of the training
    data (stratified, seeded). Returns (best l1, {l1: validation AUROC}); ties favour sparser."""
    y = torch.as_tensor(labels).flatten().long()
    tr, va = stratified_split(y, val_fraction, seed)
    results: dict[float, float] = {}
    for l1 in grid:
        probe = RiskProbe.fit(features[tr], y[tr], layout, l1=l1)
        results[l1] = auroc(probe.predict_proba(features[va]), y[va])
    best = max(sorted(grid, reverse=True), key=lambda g: results[g])
    return best, results
