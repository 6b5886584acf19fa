"""Incremental latent readouts per engine slot: O(1) work per token, results built once per request.

The steering hooks hand every forward's latents to :meth:`SlotReadouts.add` (the plan table's
recorder): per SAE and phase, the latents before and after the row's edits, shape (B, T, d_sae),
with the slot of each batch row and a (B, T) valid mask (left padding = False). For each slot that
reads the SAE this keeps

- a running sum / max / count over valid positions, before and after edits ((S, d_sae) tensors
  updated in place with ``index_add_`` / ``scatter_reduce_``: what pooled latents and the risk
  probe read), and
- when the request asked for per-position latents, the top-k (indices, values) of every valid
  position, as one small chunk per forward (a decode step adds one position).

:meth:`finish` turns one slot's state into the ``{sae: SaeReadout}`` dict of
:mod:`sae_runtime.steering.readout`, the shape result assembly reads; :meth:`decode_position`
gives one generated position's top-k while it streams, and :meth:`risk_pools` the probe's input
from the running sums, so a running risk score costs O(d_sae) per token, not O(tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from sae_runtime.steering.readout import LatentPool, PhaseReadout, SaeReadout, TopLatents, sum_max

_PHASES = ("prefill", "decode")


@dataclass
class _SlotReads:
    """What one slot reads: sae -> top-k per position (0 = pooled statistics only)."""

    top_k: dict[str, int]
    # (sae, phase) -> list of (before_idx, before_val, after_idx, after_val), each (n, k), in forward order
    chunks: dict[tuple[str, str], list[tuple[Tensor, Tensor, Tensor, Tensor]]] = field(default_factory=dict)
    grid: dict[tuple[str, str], tuple[int, int] | None] = field(default_factory=dict)


class _Pools:
    """Running sums, maxima and counts of one SAE in one phase, for every slot."""

    def __init__(self, n_slots: int, d_sae: int, device: torch.device, dtype: torch.dtype) -> None:
        self.sum_before = torch.zeros(n_slots, d_sae, device=device, dtype=dtype)
        self.sum_after = torch.zeros_like(self.sum_before)
        self.max_before = torch.full_like(self.sum_before, float("-inf"))
        self.max_after = torch.full_like(self.sum_before, float("-inf"))
        self.count = torch.zeros(n_slots, dtype=torch.long, device=device)

    def reset(self, slot: int) -> None:
        self.sum_before[slot] = 0
        self.sum_after[slot] = 0
        self.max_before[slot] = float("-inf")
        self.max_after[slot] = float("-inf")
        self.count[slot] = 0

    def add(self, slots_t: Tensor, before: Tensor, after: Tensor, valid: Tensor | None) -> None:
        if valid is None:
            counts = torch.full((before.shape[0],), before.shape[1], dtype=torch.long, device=before.device)
        else:
            counts = valid.sum(1)
        self.count.index_add_(0, slots_t, counts)
        pooled_before = sum_max(before, valid)
        pooled_after = pooled_before if after is before else sum_max(after, valid)
        for (s, m), total, peak in ((pooled_before, self.sum_before, self.max_before), (pooled_after, self.sum_after, self.max_after)):
            total.index_add_(0, slots_t, s)
            peak.scatter_reduce_(0, slots_t.unsqueeze(1).expand_as(m), m, "amax")

    def stats(self, slot: int, after: bool) -> LatentPool:
        total, peak = (self.sum_after, self.max_after) if after else (self.sum_before, self.max_before)
        mx = peak[slot].cpu()
        return LatentPool(total[slot].cpu(), torch.where(torch.isinf(mx), torch.zeros_like(mx), mx), int(self.count[slot]))


class SlotReadouts:
    """The readout recorder of an engine with ``n_slots`` slots over SAEs with widths ``d_sae``."""

    def __init__(self, n_slots: int, d_sae: Mapping[str, int]) -> None:
        self.n_slots = n_slots
        self.d_sae = dict(d_sae)
        self._reads: list[_SlotReads | None] = [None] * n_slots
        self._pools: dict[tuple[str, str], _Pools] = {}

    # -- slot lifecycle ----------------------------------------------------------------------
    def assign(self, slot: int, top_k: Mapping[str, int]) -> None:
        """Start recording ``slot`` for a new request: sae -> top-k (0 = pools only)."""
        self._reads[slot] = _SlotReads(dict(top_k)) if top_k else None
        for (name, _), pools in self._pools.items():
            if name in top_k:
                pools.reset(slot)

    def release(self, slot: int) -> None:
        self._reads[slot] = None

    def reads(self, slot: int) -> bool:
        return self._reads[slot] is not None

    @property
    def read_saes(self) -> frozenset[str]:
        """SAEs some slot reads (the hooks encode these for the whole forward)."""
        return frozenset(n for r in self._reads if r is not None for n in r.top_k)

    # -- the hooks' side -------------------------------------------------------------------------
    def add(self, name: str, phase: str, rows: Sequence[int], before: Tensor, after: Tensor,
            valid: Tensor | None, grid: tuple[int, int] | None) -> None:
        """One forward's latents (B, T, d_sae) of SAE ``name``; ``rows`` = the slot of each batch row."""
        keep = [j for j, s in enumerate(rows) if self._reads[s] is not None and name in self._reads[s].top_k]
        if not keep:
            return
        if len(keep) != len(rows):
            idx = torch.tensor(keep, device=before.device)
            before = before.index_select(0, idx)
            after = before if after is before else after.index_select(0, idx)
            valid = None if valid is None else valid.index_select(0, idx)
        slots = [rows[j] for j in keep]
        pools = self._pools.get((name, phase))
        if pools is None:
            pools = self._pools[(name, phase)] = _Pools(self.n_slots, before.shape[-1], before.device, before.dtype)
        pools.add(torch.tensor(slots, device=before.device), before, after, valid)
        k = max(self._reads[s].top_k[name] for s in slots)
        if k <= 0:
            return
        k = min(k, before.shape[-1])
        bv, bi = before.topk(k, dim=-1)
        av, ai = (bv, bi) if after is before else after.topk(k, dim=-1)
        for j, slot in enumerate(slots):
            reads = self._reads[slot]
            own = min(reads.top_k[name], k)  # this forward's k is its rows' largest
            if own <= 0:
                continue
            sel = slice(None) if valid is None else valid[j]
            reads.chunks.setdefault((name, phase), []).append(
                tuple(t[j][sel][:, :own] for t in (bi, bv, ai, av)))
            reads.grid[(name, phase)] = grid

    # -- results ---------------------------------------------------------------------------------
    def decode_position(self, slot: int, name: str, index: int) -> SaeReadout | None:
        """The ``index``-th generated position of ``slot`` for SAE ``name`` as a one-position readout."""
        reads = self._reads[slot]
        chunks = reads.chunks.get((name, "decode"), []) if reads is not None else []
        if index >= len(chunks):
            return None
        bi, bv, ai, av = (t.cpu() for t in chunks[index])
        empty = LatentPool(torch.zeros(0), torch.zeros(0), 0)
        return SaeReadout(name, {"decode": PhaseReadout(TopLatents(bi, bv), TopLatents(ai, av), empty, empty)})

    def risk_pools(self, slots: Sequence[int], saes: Sequence[str], with_generated: bool) -> list[dict]:
        """Per slot: the probe's input (sae -> risk.PooledStats of after-edit means and maxima)."""
        from sae_runtime.risk import PooledStats

        out: list[dict] = [{} for _ in slots]
        for name in saes:
            per_phase = []
            for phase in _PHASES if with_generated else _PHASES[:1]:
                pools = self._pools.get((name, phase))
                if pools is None:
                    zero = torch.zeros(len(slots), self.d_sae[name])
                    per_phase.append((zero, zero))
                    continue
                idx = torch.tensor(list(slots), device=pools.count.device)
                count = pools.count.index_select(0, idx).clamp_min(1).unsqueeze(1)
                mean = (pools.sum_after.index_select(0, idx) / count).float().cpu()
                mx = pools.max_after.index_select(0, idx).float().cpu()
                per_phase.append((mean, torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)))
            for j in range(len(slots)):
                flat = [t[j] for pair in per_phase for t in pair]
                out[j][name] = PooledStats(*flat)
        return out

    def finish(self, slot: int) -> dict[str, SaeReadout]:
        """``slot``'s readout: sae -> SaeReadout over the phases it saw (CPU tensors)."""
        reads = self._reads[slot]
        if reads is None:
            return {}
        out: dict[str, SaeReadout] = {}
        for name, k in reads.top_k.items():
            phases: dict[str, PhaseReadout] = {}
            for phase in _PHASES:
                pools = self._pools.get((name, phase))
                if pools is None or int(pools.count[slot]) == 0:
                    continue
                chunks = reads.chunks.get((name, phase), [])
                if chunks:
                    bi, bv, ai, av = (torch.cat([c[i] for c in chunks]).cpu() for i in range(4))
                else:
                    none_i, none_v = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0)
                    bi, bv, ai, av = none_i, none_v, none_i, none_v
                phases[phase] = PhaseReadout(TopLatents(bi, bv), TopLatents(ai, av), pools.stats(slot, after=False),
                                             pools.stats(slot, after=True), reads.grid.get((name, phase)))
            out[name] = SaeReadout(name, phases)
        return out


__all__ = ["SlotReadouts"]
