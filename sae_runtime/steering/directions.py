"""Edits that act on the activation x along a direction: projections on a latent's decoder
direction, and steering vectors. Compiled once per context into per-row tables, like :mod:`.compile`.

Each row has a list of *slots* in plan order (P = the longest list over rows); slot p of row b is
one edit with direction ``dir`` (d,) and coefficients, and every op is one formula:

    c = <x, dir>,  k = alpha + beta * ||x|| + gamma * (target - c),  x' = x + w * k * dir
    target = min(c, value) if is_cap else value

==================  ===================  =======  =======  =====  ======
edit                dir                  alpha    beta     gamma  is_cap
==================  ===================  =======  =======  =====  ======
vector add v        d                    v        0        0      -
vector add v, norm  d / ||d||            0        v        0      -
project_set v       u (unit)             0        0        1      no
project_cap v       u (unit)             0        0        1      yes
==================  ===================  =======  =======  =====  ======

with u = W_dec[i] / ||W_dec[i]|| for a latent (one slot per latent of the edit, in order) or
d / ||d|| for a vector. ``w`` (R, N, 1) is the scope weight times the slot's condition mask. A row
with fewer slots has all-zero coefficients in the others, so it gets x + 0 (unchanged). A zero
direction leaves x unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import Condition, EditOp, InterventionPlan
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.steering.compile import PROJECTION_OPS


@dataclass(frozen=True)
class DirectionTable:
    """One key's (an SAE's projections, or a site's vectors) slots for every row, CPU float64.

    ``dirs`` (P, B, d); ``alpha``/``beta``/``gamma``/``value`` (P, B); ``is_cap`` (P, B) bool;
    ``cond`` (P, B) long: 1-based index into ``conditions`` (0 = unconditional).
    ``rows[b]``: row b has at least one slot.
    """

    dirs: Tensor
    alpha: Tensor
    beta: Tensor
    gamma: Tensor
    value: Tensor
    is_cap: Tensor
    cond: Tensor
    conditions: tuple[Condition, ...]
    rows: tuple[bool, ...]


def _unit(d: Tensor) -> Tensor:
    n = d.norm()
    return d / n if float(n) > 0 else d


def _table(slots: list[list[tuple[Tensor, float, float, float, float, bool, Condition | None]]],
           width: int) -> DirectionTable:
    n_rows, depth = len(slots), max(len(s) for s in slots)
    shape = (depth, n_rows)
    dirs = torch.zeros(depth, n_rows, width, dtype=torch.float64)
    alpha, beta, gamma, value = (torch.zeros(shape, dtype=torch.float64) for _ in range(4))
    is_cap, cond = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.long)
    conditions = list(dict.fromkeys(s[-1] for row in slots for s in row if s[-1] is not None))
    cid = {c: n + 1 for n, c in enumerate(conditions)}
    for r, row in enumerate(slots):
        for p, (d, a, b, g, v, cap, c) in enumerate(row):
            dirs[p, r] = d
            alpha[p, r], beta[p, r], gamma[p, r], value[p, r], is_cap[p, r] = a, b, g, v, cap
            cond[p, r] = 0 if c is None else cid[c]
    return DirectionTable(dirs, alpha, beta, gamma, value, is_cap, cond, tuple(conditions),
                          tuple(bool(s) for s in slots))


def _slot(op: EditOp, direction: Tensor, value: float, normalize: bool, condition: Condition | None):
    if op is EditOp.ADD:
        if normalize:
            return (_unit(direction), 0.0, value, 0.0, 0.0, False, condition)
        return (direction, value, 0.0, 0.0, 0.0, False, condition)
    return (_unit(direction), 0.0, 0.0, 1.0, value, op is EditOp.PROJECT_CAP, condition)


def compile_projections(plans: Sequence[InterventionPlan | None], saes: Mapping[str, Sae]) -> dict[str, DirectionTable]:
    """Per SAE: the projection edits (project_set / project_cap) of every row, one slot per latent."""
    per: dict[str, list[list]] = {}
    for r, plan in enumerate(plans):
        for e in () if plan is None else plan.edits:
            op = EditOp(e.op)
            if op not in PROJECTION_OPS:
                continue
            rows = per.setdefault(e.sae, [[] for _ in plans])
            w_dec = saes[e.sae].W_dec.detach()
            for i in e.latents:
                rows[r].append(_slot(op, w_dec[int(i)].double().cpu(), float(e.value), False, e.condition))
    return {name: _table(rows, saes[name].d_in) for name, rows in per.items()}


def compile_vectors(plans: Sequence[InterventionPlan | None]) -> dict[HookSite, DirectionTable]:
    """Per hook site: the steering-vector edits of every row (validated: ``direction`` set)."""
    per: dict[HookSite, list[list]] = {}
    width: dict[HookSite, int] = {}
    for r, plan in enumerate(plans):
        for v in () if plan is None else plan.vectors:
            if v.direction is None:
                raise ValueError("vector edits must be validated (InterventionPlan.resolve) first")
            site = HookSite.parse(v.site)
            d = v.direction.detach().double().cpu().flatten()
            if width.setdefault(site, d.numel()) != d.numel():
                raise InvalidArgument(f"vectors of widths {width[site]} and {d.numel()} at site {site.name}",
                                      field="plan.vectors")
            per.setdefault(site, [[] for _ in plans])[r].append(
                _slot(EditOp(v.op), d, float(v.value), bool(v.normalize), v.condition))
    return {site: _table(rows, width[site]) for site, rows in per.items()}


@dataclass
class DirectionGroup:
    """The rows of one hook batch that a table edits in one forward, tensors on device.

    ``rows`` (R,) hook-batch indices; ``dirs`` (P, R, d); the coefficients (P, R, 1, 1);
    ``cond`` (P, R) long or None (no slot of these rows is conditional).
    """

    rows: Tensor
    all_rows: bool
    plan_rows: tuple[int, ...]
    dirs: Tensor
    alpha: Tensor | None
    beta: Tensor | None
    gamma: Tensor | None
    value: Tensor
    is_cap: Tensor
    cond: Tensor | None
    conditions: tuple[Condition, ...]
    dtype: torch.dtype
    any_cap: bool = True  # some slot is project_cap (else the target is the value itself)


def make_direction_group(table: DirectionTable, batch_rows: Sequence[int], plan_rows: Sequence[int], n_batch: int,
                         device: torch.device, dtype: torch.dtype) -> DirectionGroup:
    """Gather the slots of ``plan_rows`` (one per hook-batch row in ``batch_rows``) onto ``device``."""
    sel = torch.tensor(list(plan_rows), dtype=torch.long)
    pick = lambda t: t.index_select(1, sel)  # noqa: E731
    coef = lambda t: t.unsqueeze(-1).unsqueeze(-1).to(device=device, dtype=dtype)  # noqa: E731
    alpha, beta, gamma, is_cap = pick(table.alpha), pick(table.beta), pick(table.gamma), pick(table.is_cap)
    cond_cpu = pick(table.cond)
    cond, conditions = None, ()
    used = sorted(set(cond_cpu.unique().tolist()) - {0})
    if used:
        remap = torch.zeros(len(table.conditions) + 1, dtype=torch.long)
        remap[torch.tensor(used)] = torch.arange(1, len(used) + 1)
        cond = remap[cond_cpu].to(device)
        conditions = tuple(table.conditions[u - 1] for u in used)
    return DirectionGroup(
        rows=torch.tensor(list(batch_rows), dtype=torch.long, device=device),
        all_rows=list(batch_rows) == list(range(n_batch)),
        plan_rows=tuple(plan_rows),
        dirs=pick(table.dirs).to(device=device, dtype=dtype),
        alpha=coef(alpha) if bool((alpha != 0).any()) else None,
        beta=coef(beta) if bool((beta != 0).any()) else None,
        gamma=coef(gamma) if bool((gamma != 0).any()) else None,
        value=coef(pick(table.value)),
        is_cap=is_cap.unsqueeze(-1).unsqueeze(-1).to(device),
        cond=cond,
        conditions=conditions,
        dtype=dtype,
        any_cap=bool(is_cap.any()),
    )


def apply_directions(g: DirectionGroup, x: Tensor, weight: Tensor | None, masks: Tensor | None) -> Tensor:
    """x (R, N, d) after every slot in order. ``weight`` (R, N, 1) scope weight or None (all 1);
    ``masks`` (R, N, 1 + C) bool as for :func:`~.compile.apply_ops` (needed when ``g.cond`` is set).

    Each slot is x' = x + (w * k) * dir in one ``addcmul``; terms whose coefficients are zero for
    every row (no adds, no norm-relative adds, no projections, no caps) are skipped.
    """
    for p in range(g.dirs.shape[0]):
        d = g.dirs[p]  # (R, d)
        k = g.alpha[p] if g.alpha is not None else None  # (R, 1, 1), then (R, N, 1)
        if g.beta is not None:
            term = g.beta[p] * x.norm(dim=-1, keepdim=True)
            k = term if k is None else k + term
        if g.gamma is not None:
            c = torch.bmm(x, d.unsqueeze(-1))  # (R, N, 1)
            target = torch.where(g.is_cap[p], torch.minimum(c, g.value[p]), g.value[p]) if g.any_cap else g.value[p]
            term = g.gamma[p] * (target - c)
            k = term if k is None else k + term
        if k is None:
            continue
        w = weight
        if g.cond is not None and masks is not None:
            idx = g.cond[p].view(-1, 1, 1).expand(x.shape[0], x.shape[1], 1)
            m = torch.gather(masks, 2, idx).to(x.dtype)
            w = m if w is None else w * m
        x = torch.addcmul(x, k if w is None else k * w, d.unsqueeze(1))
    return x


__all__ = ["DirectionGroup", "DirectionTable", "PROJECTION_OPS", "apply_directions", "compile_projections",
           "compile_vectors", "make_direction_group"]
