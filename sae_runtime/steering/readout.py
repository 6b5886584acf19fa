"""Latent readouts gathered by the steering hooks: per-position top-k and pooled statistics.

For each SAE in the ReadoutSpec and each phase (``prefill`` = prompt positions, ``decode`` =
generated positions, ``denoise`` = U-Net steps), every forward adds a chunk: the top-k latents at
each position before and after the row's edits, and running per-row sums / maxima / counts over
valid positions (padding is ignored). :meth:`ReadoutAccumulator.finish` turns them into plain CPU
tensors per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class TopLatents:
    """Top-k latents at each valid position: ``indices`` (N, k) long and ``values`` (N, k)."""

    indices: Tensor
    values: Tensor


@dataclass(frozen=True)
class LatentPool:
    """Per-sequence statistics over ``count`` valid positions: ``sum`` and ``max`` are (d_sae,).

    ``max`` is 0 where ``count`` is 0.
    """

    sum: Tensor
    max: Tensor
    count: int

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)


@dataclass(frozen=True)
class PhaseReadout:
    """One SAE's latents over one phase of one row: before and after that row's edits.

    Positions are in forward order (prefill positions, then one per decode step); padding is
    dropped. ``grid`` is the U-Net block's (H, W): each denoising step adds H * W positions.
    """

    before: TopLatents
    after: TopLatents
    pooled_before: LatentPool
    pooled_after: LatentPool
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class SaeReadout:
    """One SAE's readout for one row, per phase (``prefill``, ``decode``, ``denoise``)."""

    sae: str
    phases: Mapping[str, PhaseReadout] = field(default_factory=dict)

    @property
    def prompt(self) -> PhaseReadout | None:
        return self.phases.get("prefill")

    @property
    def generated(self) -> PhaseReadout | None:
        return self.phases.get("decode")


def sum_max(f: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(sum, max) of latents f (R, N, d_sae) over the valid positions of each row: (R, d_sae) each.
    ``valid`` (R, N) bool, None = all valid."""
    if valid is None:
        if f.shape[1] == 1:
            return f[:, 0], f[:, 0]
        return f.sum(1), f.amax(1)
    w = valid.unsqueeze(-1)
    return (f * w).sum(1), f.masked_fill(~w, float("-inf")).amax(1)


@dataclass
class _Chunk:
    rows: tuple[int, ...]  # plan row of each entry
    valid: Tensor | None  # (R, N) bool
    before_idx: Tensor
    before_val: Tensor
    after_idx: Tensor
    after_val: Tensor


class ReadoutAccumulator:
    """Running readout of one SAE in one phase, for ``n_rows`` plan rows."""

    def __init__(self, n_rows: int, d_sae: int, top_k: int, device: torch.device, dtype: torch.dtype) -> None:
        self.n_rows = n_rows
        self.top_k = min(top_k, d_sae)
        z = lambda: torch.zeros(n_rows, d_sae, device=device, dtype=dtype)  # noqa: E731
        self.sum_before, self.sum_after = z(), z()
        self.max_before = torch.full((n_rows, d_sae), float("-inf"), device=device, dtype=dtype)
        self.max_after = self.max_before.clone()
        self.count = torch.zeros(n_rows, device=device, dtype=torch.long)  # positions under a valid mask
        self.count_all = [0] * n_rows  # positions of forwards without a valid mask (all valid)
        self.chunks: list[_Chunk] = []
        self.grid: tuple[int, int] | None = None

    def add(self, rows: tuple[int, ...], before: Tensor, after: Tensor, valid: Tensor | None,
            grid: tuple[int, int] | None) -> None:
        """Add latents (R, N, d_sae) of hook-batch entries belonging to plan ``rows`` (R,).

        ``after`` may be ``before`` itself (no edit in this forward).
        """
        identity = tuple(rows) == tuple(range(self.n_rows))
        rows_t = None if identity else torch.tensor(rows, device=before.device, dtype=torch.long)
        self.grid = grid
        bv, bi = before.topk(self.top_k, dim=-1)
        av, ai = (bv, bi) if after is before else after.topk(self.top_k, dim=-1)
        self.chunks.append(_Chunk(rows, valid, bi, bv, ai, av))
        pooled = sum_max(before, valid)
        for f, total, peak in ((before, self.sum_before, self.max_before), (after, self.sum_after, self.max_after)):
            s, m = pooled if f is before else sum_max(f, valid)
            if rows_t is None:
                total.add_(s)
                torch.maximum(peak, m, out=peak)
            else:
                total.index_add_(0, rows_t, s)
                peak.scatter_reduce_(0, rows_t.unsqueeze(1).expand_as(m), m, "amax")
        if valid is None:
            for r in rows:
                self.count_all[r] += before.shape[1]
        elif rows_t is None:
            self.count.add_(valid.sum(1))
        else:
            self.count.index_add_(0, rows_t, valid.sum(1))

    def _merged_chunks(self) -> list[_Chunk]:
        """The chunks on the CPU, runs of consecutive chunks over the same rows concatenated along
        positions (a decode phase is one chunk per token): finish then slices each row once per run."""
        runs: list[list[_Chunk]] = []
        for c in self.chunks:
            if runs and runs[-1][0].rows == c.rows:
                runs[-1].append(c)
            else:
                runs.append([c])
        merged = []
        for run in runs:
            cat = lambda name: torch.cat([getattr(c, name) for c in run], dim=1).cpu()  # noqa: E731
            valid = None
            if any(c.valid is not None for c in run):
                valid = torch.cat([
                    torch.ones(c.before_idx.shape[:2], dtype=torch.bool, device=c.before_idx.device)
                    if c.valid is None else c.valid for c in run
                ], dim=1).cpu()
            merged.append(_Chunk(run[0].rows, valid, cat("before_idx"), cat("before_val"), cat("after_idx"),
                                 cat("after_val")))
        return merged

    def finish(self) -> list[PhaseReadout | None]:
        """Per plan row: its PhaseReadout on the CPU (None for a row this phase never saw)."""
        count = self.count.cpu()
        cpu = [t.cpu() for t in (self.sum_before, self.max_before, self.sum_after, self.max_after)]
        parts_of: list[list[tuple[Tensor, ...]]] = [[] for _ in range(self.n_rows)]  # in forward order
        for c in self._merged_chunks():
            for j, row in enumerate(c.rows):
                keep = slice(None) if c.valid is None else c.valid[j]
                parts_of[row].append((c.before_idx[j][keep], c.before_val[j][keep], c.after_idx[j][keep],
                                      c.after_val[j][keep]))
        out: list[PhaseReadout | None] = []
        for r in range(self.n_rows):
            parts = parts_of[r]
            if not parts:
                out.append(None)
                continue
            bi, bv, ai, av = (torch.cat([p[i] for p in parts]) for i in range(4))
            n = int(count[r]) + self.count_all[r]
            mb = torch.where(torch.isinf(cpu[1][r]), torch.zeros_like(cpu[1][r]), cpu[1][r])
            ma = torch.where(torch.isinf(cpu[3][r]), torch.zeros_like(cpu[3][r]), cpu[3][r])
            out.append(PhaseReadout(
                before=TopLatents(bi, bv), after=TopLatents(ai, av),
                pooled_before=LatentPool(cpu[0][r], mb, n), pooled_after=LatentPool(cpu[2][r], ma, n),
                grid=self.grid,
            ))
        return out


class ReadoutRecorder(Protocol):
    """Where the steering hooks hand each forward's latents (B, T, d_sae) before and after edits."""

    def add(self, name: str, phase: str, rows: Sequence[int], before: Tensor, after: Tensor,
            valid: Tensor | None, grid: tuple[int, int] | None) -> None: ...


class AccumulatingRecorder:
    """Readouts of a fixed batch of ``n_rows`` plan rows over one run: one accumulator per
    (SAE, phase), turned into per-row :class:`SaeReadout` dicts by :meth:`readouts`."""

    def __init__(self, n_rows: int, top_k: int) -> None:
        self.n_rows, self.top_k = n_rows, top_k
        self._acc: dict[tuple[str, str], ReadoutAccumulator] = {}

    def add(self, name: str, phase: str, rows: Sequence[int], before: Tensor, after: Tensor,
            valid: Tensor | None, grid: tuple[int, int] | None) -> None:
        acc = self._acc.get((name, phase))
        if acc is None:
            acc = self._acc[(name, phase)] = ReadoutAccumulator(self.n_rows, before.shape[-1], self.top_k,
                                                                before.device, before.dtype)
        acc.add(tuple(rows), before, after, valid, grid)

    def readouts(self, saes: Sequence[str]) -> list[dict[str, SaeReadout]]:
        """Per plan row: SAE name -> its readout (phases it was seen in), on the CPU."""
        per_row: list[dict[str, dict]] = [{n: {} for n in saes} for _ in range(self.n_rows)]
        for (name, phase), acc in self._acc.items():
            for r, phase_readout in enumerate(acc.finish()):
                if phase_readout is not None:
                    per_row[r].setdefault(name, {})[phase] = phase_readout
        return [{n: SaeReadout(n, phases) for n, phases in row.items()} for row in per_row]
