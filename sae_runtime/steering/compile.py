"""Compile a batch of per-row plans into dense per-row tensors, once per steering context.

Every edit op is an affine map followed by an optional cap, so one formula covers all of them:

    f' = min(f * mul + add + add_norm * ||x_n||, cap)

============  =====  =====  ===================  =====
op            mul    add    add_norm             cap
============  =====  =====  ===================  =====
(no edit)     1      0      0                    +inf
set v         0      v      0                    +inf
ablate        0      0      0                    +inf
scale v       v      0      0                    +inf
add v         1      v      0                    +inf
add v, norm   1      0      v / ||W_dec[i]||     +inf
cap v         1      0      0                    v
============  =====  =====  ===================  =====

A row that edits the same latent several times gets one *layer* per edit, applied in plan order,
so the tensors are (K, B, U): K layers, B rows, U = the union of latents any row edits on that SAE.
These formulas give exact results (``f * 0 + v == v``, ``f * 1 + 0 == f`` for finite f).

A conditional edit (``LatentEdit.condition``) is the same layer masked per position:
``f_k = where(cond, op_k(f_{k-1}), f_{k-1})``; ``cond`` (K, B, U) holds, per layer entry, the
1-based index of its condition in ``conditions`` (0 = unconditional). Projection ops
(``project_set`` / ``project_cap``) act on the activation, not on latents: they are compiled by
:mod:`.directions`, not here.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from sae_runtime.plan import Condition, EditOp, InterventionPlan
from sae_runtime.saes.base import Sae


#: Ops that act on the activation along a latent's decoder direction (compiled by .directions).
PROJECTION_OPS = frozenset({EditOp.PROJECT_SET, EditOp.PROJECT_CAP})


@dataclass(frozen=True)
class CompiledEdits:
    """One SAE's edits for every row of a batch, as CPU tensors (device copies are made per group).

    ``mul``/``add``/``add_norm``/``cap`` are (K, B, U) float64 on the CPU; ``latents`` is (U,).
    ``edits_row[b]`` tells whether row b edits this SAE at all; ``preserve[b]`` its preserve_error.
    """

    sae: str
    latents: Tensor
    mul: Tensor
    add: Tensor
    add_norm: Tensor
    cap: Tensor
    edits_row: tuple[bool, ...]
    preserve: tuple[bool, ...]
    #: (K, B, U) long: 1-based index into ``conditions`` of each layer entry's condition, 0 = none;
    #: None when no edit of this SAE has a condition.
    cond: Tensor | None = None
    conditions: tuple[Condition, ...] = ()

    @property
    def layers(self) -> int:
        return self.mul.shape[0]


def compile_edits(plans: Sequence[InterventionPlan | None], saes: Mapping[str, Sae]) -> dict[str, CompiledEdits]:
    """Per SAE named by any plan: the union of edited latents and the per-row op tensors.

    Plans must be validated (``InterventionPlan.resolve``): ops are EditOp, latents are ints.
    """
    n_rows = len(plans)
    # sae -> row -> list of (latent, op, value, normalize, condition) in plan order
    per_sae: dict[str, list[list[tuple[int, EditOp, float, bool, Condition | None]]]] = {}
    for row, plan in enumerate(plans):
        if plan is None:
            continue
        for edit in plan.edits:
            if EditOp(edit.op) in PROJECTION_OPS:
                continue
            rows = per_sae.setdefault(edit.sae, [[] for _ in range(n_rows)])
            for latent in edit.latents:
                rows[row].append((int(latent), EditOp(edit.op), float(edit.value), bool(edit.normalize),
                                  edit.condition))

    compiled: dict[str, CompiledEdits] = {}
    for name, rows in per_sae.items():
        union = sorted({lat for row in rows for lat, *_ in row})
        col = {lat: j for j, lat in enumerate(union)}
        k = max(Counter((r, lat) for r, row in enumerate(rows) for lat, *_ in row).values(), default=1)
        u = len(union)
        # Entries are collected as (layer, row, column) -> value and written with one indexed
        # assignment per tensor: writing entry by entry costs microseconds each, and an engine
        # step that admits rows recompiles every running row's plan.
        entries: dict[str, tuple[list[tuple[int, int, int]], list[float]]] = {k_: ([], []) for k_ in
                                                                           ("mul", "add", "add_norm", "cap", "cond")}

        def put(which: str, at: tuple[int, int, int], value: float) -> None:
            entries[which][0].append(at)
            entries[which][1].append(value)

        idx = torch.tensor(union, dtype=torch.long)
        row_norms: list[float] | None = None
        conditions = list(dict.fromkeys(c for row in rows for *_, c in row if c is not None))
        cond_id = {c: n + 1 for n, c in enumerate(conditions)}
        for r, row in enumerate(rows):
            layer = [0] * u
            for lat, op, value, normalize, condition in row:
                j = col[lat]
                at = (layer[j], r, j)
                layer[j] += 1
                if condition is not None:
                    put("cond", at, cond_id[condition])
                if op is EditOp.SET:
                    put("mul", at, 0.0)
                    put("add", at, value)
                elif op is EditOp.ABLATE:
                    put("mul", at, 0.0)
                elif op is EditOp.SCALE:
                    put("mul", at, value)
                elif op is EditOp.ADD and normalize:
                    if row_norms is None:
                        rows_w = saes[name].decoder_rows(idx.to(saes[name].W_dec.device))
                        row_norms = rows_w.detach().double().norm(dim=-1).cpu().tolist()
                    norm = row_norms[j]
                    put("add_norm", at, value / norm if norm > 0 else 0.0)
                elif op is EditOp.ADD:
                    put("add", at, value)
                elif op is EditOp.CAP:
                    put("cap", at, value)
        shape = (k, n_rows, u)

        def filled(which: str, default: float, dtype: torch.dtype) -> Tensor:
            out = torch.full(shape, default, dtype=dtype)
            at, values = entries[which]
            if at:
                out[tuple(torch.tensor(at, dtype=torch.long).unbind(1))] = torch.tensor(values, dtype=dtype)
            return out

        cond = filled("cond", 0, torch.long) if conditions else None
        preserve = tuple(True if p is None else bool(p.preserve_error) for p in plans)
        compiled[name] = CompiledEdits(
            sae=name, latents=idx, mul=filled("mul", 1.0, torch.float64), add=filled("add", 0.0, torch.float64),
            add_norm=filled("add_norm", 0.0, torch.float64), cap=filled("cap", math.inf, torch.float64),
            edits_row=tuple(bool(row) for row in rows), preserve=preserve, cond=cond, conditions=tuple(conditions),
        )
    return compiled


@dataclass
class EditGroup:
    """The rows of one hook batch that one SAE edits in one forward, with their op tensors on device.

    ``rows`` are hook-batch indices (R,); tensors are (K, R, 1, U) in the SAE's dtype, or None
    when they are the identity for every entry (so the hot path skips those ops).
    """

    rows: Tensor
    all_rows: bool
    replace: bool  # preserve_error False: the reconstruction replaces the activation
    latents: Tensor
    decoder_rows: Tensor  # (U, d_in)
    mul: Tensor | None
    add: Tensor | None
    add_norm: Tensor | None
    cap: Tensor | None
    mul_zero: bool  # every mul is 0 and K == 1: f' = add (set / ablate only)
    plan_rows: tuple[int, ...]  # the plan row of each hook-batch row in ``rows``
    #: The SAE restricted to ``latents`` (:meth:`Sae.restrict`), or None: use encode_selected.
    encoder: Sae | None = None
    #: All rows, error term kept, restricted encoder, no input normalisation, no normalised add:
    #: the context may take its shortest path.
    lean: bool = False
    #: (K, R, 1, U) long on device: per layer entry, the index of its condition in ``conditions``
    #: plus one (0 = unconditional); None when no entry of these rows has a condition.
    cond: Tensor | None = None
    conditions: tuple[Condition, ...] = ()
    #: With ``mul_zero``: f' itself, (R, 1, U) (or a 0-d zero for ablations only), made once
    #: here rather than indexed out of ``add`` on every forward.
    set_to: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder_rows.dtype


def make_group(
    compiled: CompiledEdits, sae: Sae, batch_rows: Sequence[int], plan_rows: Sequence[int], n_batch: int, replace: bool,
    encoder: Sae | None = None,
) -> EditGroup:
    """Gather the op tensors of ``plan_rows`` (one per hook-batch row in ``batch_rows``) onto the SAE's device."""
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    sel = torch.tensor(list(plan_rows), dtype=torch.long)

    def gather(t: Tensor, identity: float) -> Tensor | None:
        g = t.index_select(1, sel)
        if bool((g == identity).all()):
            return None
        return g.unsqueeze(2).to(device=device, dtype=dtype)

    mul_cpu = compiled.mul.index_select(1, sel)
    latents = compiled.latents.to(device)
    cond, conditions = None, ()
    if compiled.cond is not None:
        c = compiled.cond.index_select(1, sel)
        used = sorted(set(c.unique().tolist()) - {0})
        if used:  # renumber 1..C over the conditions these rows use
            remap = torch.zeros(len(compiled.conditions) + 1, dtype=torch.long)
            remap[torch.tensor(used)] = torch.arange(1, len(used) + 1)
            cond = remap[c].unsqueeze(2).to(device)
            conditions = tuple(compiled.conditions[u - 1] for u in used)
    group = EditGroup(
        rows=torch.tensor(list(batch_rows), dtype=torch.long, device=device),
        all_rows=list(batch_rows) == list(range(n_batch)),
        replace=replace,
        latents=latents,
        decoder_rows=sae.decoder_rows(latents).detach(),
        mul=gather(compiled.mul, 1.0),
        add=gather(compiled.add, 0.0),
        add_norm=gather(compiled.add_norm, 0.0),
        cap=gather(compiled.cap, math.inf),
        mul_zero=compiled.layers == 1 and bool((mul_cpu == 0).all()) and cond is None,
        plan_rows=tuple(plan_rows),
        encoder=encoder,
        cond=cond,
        conditions=conditions,
    )
    if group.mul_zero:
        group.set_to = group.add[0] if group.add is not None else torch.zeros((), dtype=dtype, device=device)
    group.lean = (
        group.all_rows and not replace and encoder is not None and group.add_norm is None
        and sae.cfg.normalize_activations in ("none", "expected_average_only_in") and cond is None
    )
    return group


def apply_ops(group: EditGroup, f: Tensor, x_norm: Tensor | None, masks: Tensor | None = None) -> Tensor:
    """Edited latents f' from f (R, N, U); ``x_norm`` (R, N, 1) = ||x_n|| for normalised adds;
    ``masks`` (R, N, 1 + C) bool: column 0 all True, column c whether ``group.conditions[c - 1]``
    holds at each position (needed when ``group.cond`` is set).

    The result broadcasts against f (it may be (R, 1, U) or a scalar when it does not depend on f).
    """
    if group.set_to is not None:
        # set / ablate only (no add_norm, no cap): f' = add, broadcast over positions.
        return group.set_to
    for k in range(group.mul.shape[0] if group.mul is not None else _layers(group)):
        prev = f
        if group.mul is not None:
            f = f * group.mul[k]
        if group.add is not None:
            f = f + group.add[k]
        if group.add_norm is not None and x_norm is not None:
            f = f + group.add_norm[k] * x_norm
        if group.cap is not None:
            f = torch.minimum(f, group.cap[k])
        if group.cond is not None and masks is not None:
            idx = group.cond[k].expand(prev.shape[0], prev.shape[1], group.cond.shape[-1])
            f = torch.where(torch.gather(masks, 2, idx), f.expand_as(prev), prev)
    return f


def _layers(group: EditGroup) -> int:
    for t in (group.add, group.add_norm, group.cap, group.cond):
        if t is not None:
            return t.shape[0]
    return 0
