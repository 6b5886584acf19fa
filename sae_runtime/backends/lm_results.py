"""Turn steering readouts into result dataclasses: per-position top latents, pooled latents, risk pools.

Inputs are the per-row ``{sae name: SaeReadout}`` dicts of
:meth:`sae_runtime.steering.context.SteeringContext.readouts` (CPU tensors; ``prefill`` phase =
prompt positions, ``decode`` phase = generated positions, padding and finished rows dropped).

Conventions of the results:

- a position's ``before``/``after`` lists are the SAE's top-k latents at that position before and
  after the row's edits, largest first, latents with value exactly 0 left out;
- :class:`PooledLatents` pool the AFTER-edit latents over every position of the sequence (prompt
  and generated): ``top_mean`` ranks latents by their mean, ``top_max`` by their max;
- risk pools (:func:`risk_pools`) are the after-edit means and maxima over the prompt positions and
  over the generated positions, as :class:`sae_runtime.risk.PooledStats` (what the probe reads).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from sae_runtime.backends.types import LatentActivation, PooledLatents, PositionLatents


class LabelIndex:
    """Latent index -> label lookups for the SAEs of a model (first label naming an index wins)."""

    def __init__(self, labels_by_sae: Mapping[str, Mapping[str, int]]) -> None:
        self._inverse: dict[str, dict[int, str]] = {}
        for sae, labels in labels_by_sae.items():
            inv: dict[int, str] = {}
            for label, index in labels.items():
                inv.setdefault(int(index), label)
            self._inverse[sae] = inv

    def label(self, sae: str, index: int) -> str | None:
        return self._inverse.get(sae, {}).get(index)


def _activations(sae: str, indices: Tensor, values: Tensor, k: int, labels: LabelIndex) -> tuple[LatentActivation, ...]:
    out = []
    for i, v in zip(indices[:k].tolist(), values[:k].tolist()):
        if v != 0.0:
            out.append(LatentActivation(index=int(i), value=float(v), label=labels.label(sae, int(i))))
    return tuple(out)


def position_latents(readout: Mapping[str, Any], phase: str, saes: Sequence[str], top_k: int, labels: LabelIndex,
                     count: int | None = None, start: int = 0) -> list[tuple[PositionLatents, ...]]:
    """Per position of ``phase`` ("prefill" | "decode"): one PositionLatents per SAE in ``saes``.

    ``readout`` is one row's ``{sae: SaeReadout}``; only positions ``start .. count-1`` are
    converted (all when ``count`` is None), so the list starts at position ``start``.
    """
    per_sae = []
    n = None
    for sae in saes:
        phase_readout = readout[sae].phases.get(phase) if sae in readout else None
        if phase_readout is None:
            per_sae.append(None)
            n = 0 if n is None else n
            continue
        per_sae.append(phase_readout)
        n = phase_readout.before.indices.shape[0] if n is None else min(n, phase_readout.before.indices.shape[0])
    n = n or 0
    if count is not None:
        n = min(n, count)
    positions = []
    for j in range(start, n):
        entries = []
        for sae, pr in zip(saes, per_sae):
            entries.append(PositionLatents(
                sae=sae,
                before=_activations(sae, pr.before.indices[j], pr.before.values[j], top_k, labels),
                after=_activations(sae, pr.after.indices[j], pr.after.values[j], top_k, labels),
            ))
        positions.append(tuple(entries))
    return positions


def _phase_pools(readout: Mapping[str, Any], sae: str) -> list[Any]:
    if sae not in readout:
        return []
    return [pr.pooled_after for pr in readout[sae].phases.values() if pr.pooled_after.count > 0]


def pooled_latents(readout: Mapping[str, Any], saes: Sequence[str], top_k: int, labels: LabelIndex) -> tuple[PooledLatents, ...]:
    """Per SAE: top latents by mean and by max of the after-edit latents over the whole sequence."""
    out = []
    for sae in saes:
        pools = _phase_pools(readout, sae)
        if not pools:
            out.append(PooledLatents(sae=sae, top_mean=(), top_max=()))
            continue
        count = sum(p.count for p in pools)
        mean = torch.stack([p.sum for p in pools]).sum(0) / count
        mx = torch.stack([p.max for p in pools]).amax(0)
        k = min(top_k, mean.numel())
        mv, mi = mean.topk(k)
        xv, xi = mx.topk(k)
        out.append(PooledLatents(sae=sae, top_mean=_activations(sae, mi, mv, k, labels), top_max=_activations(sae, xi, xv, k, labels)))
    return tuple(out)


def risk_pools(readout: Mapping[str, Any], saes: Sequence[str], d_sae: Mapping[str, int], with_generated: bool) -> dict[str, Any]:
    """The probe's input for one row: sae -> risk.PooledStats of the after-edit latents.

    Generated pools are omitted (None) when ``with_generated`` is False; an empty pool is zeros.
    """
    from sae_runtime.risk import PooledStats  # the probe's own container

    out = {}
    for sae in saes:
        phases = readout[sae].phases if sae in readout else {}
        means, maxes = [], []
        for phase in ("prefill", "decode"):
            pr = phases.get(phase)
            if pr is None or pr.pooled_after.count == 0:
                zero = torch.zeros(d_sae[sae])
                means.append(zero), maxes.append(zero)
            else:
                means.append(pr.pooled_after.mean.float()), maxes.append(pr.pooled_after.max.float())
        if with_generated:
            out[sae] = PooledStats(means[0], maxes[0], means[1], maxes[1])
        else:
            out[sae] = PooledStats(means[0], maxes[0])
    return out


__all__ = ["LabelIndex", "pooled_latents", "position_latents", "risk_pools"]
