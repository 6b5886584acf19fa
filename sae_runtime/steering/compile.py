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
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
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


#: Op codes of the table build below.
_SET, _ABLATE, _SCALE, _ADD, _CAP = range(5)
_CODE = {EditOp.SET: _SET, EditOp.ABLATE: _ABLATE, EditOp.SCALE: _SCALE, EditOp.ADD: _ADD, EditOp.CAP: _CAP}


def compile_edits(plans: Sequence[InterventionPlan | None], saes: Mapping[str, Sae]) -> dict[str, CompiledEdits]:
    """Per SAE named by any plan: the union of edited latents and the per-row op tensors.

    Plans must be validated (``InterventionPlan.resolve``): ops are EditOp, latents are ints.
    An engine step that admits rows recompiles every running row's plan, so this runs often:
    Python walks the edits, numpy handles their latents as arrays (a Python step per latent, or
    a torch call per table, costs more than the whole build on a small CPU).
    """
    n_rows = len(plans)
    # sae -> per edit in plan order: (row, latents, op code, value, normalize, condition)
    per_sae: dict[str, list[tuple[int, Sequence[int], int, float, bool, Condition | None]]] = {}
    for row, plan in enumerate(plans):
        if plan is None:
            continue
        for edit in plan.edits:
            op = EditOp(edit.op)
            if op in PROJECTION_OPS or not edit.latents:
                continue
            per_sae.setdefault(edit.sae, []).append(
                (row, edit.latents, _CODE[op], float(edit.value), bool(edit.normalize), edit.condition))

    preserve = tuple(True if p is None else bool(p.preserve_error) for p in plans)
    compiled: dict[str, CompiledEdits] = {}
    for name, edits in per_sae.items():
        sizes = np.array([len(e[1]) for e in edits])
        per_entry = lambda i, dtype: np.repeat(np.array([e[i] for e in edits], dtype=dtype), sizes)  # noqa: E731
        lats = np.fromiter((int(lat) for e in edits for lat in e[1]), dtype=np.int64, count=int(sizes.sum()))
        rows, code, value, normalize = per_entry(0, np.int64), per_entry(2, np.int64), per_entry(3, np.float64), per_entry(4, bool)
        union, col = np.unique(lats, return_inverse=True)
        u = len(union)
        # An entry's layer: how many earlier entries of its row edit the same latent (plan order).
        key = rows * u + col
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        layer = np.empty_like(order)
        layer[order] = np.arange(len(order)) - run_start
        shape = (int(layer.max()) + 1, n_rows, u)

        def filled(default: float, where: np.ndarray, values: np.ndarray, dtype: type = np.float64) -> Tensor:
            out = np.full(shape, default, dtype=dtype)
            out[layer[where], rows[where], col[where]] = values[where]
            return torch.from_numpy(out)

        is_add = code == _ADD
        norm_add = is_add & normalize
        add_norm = value
        if norm_add.any():
            idx = torch.from_numpy(union).to(saes[name].W_dec.device)
            norms = saes[name].decoder_rows(idx).detach().double().norm(dim=-1).cpu().numpy()[col]
            add_norm = np.divide(value, norms, out=np.zeros_like(value), where=norms > 0)
        conditions = list(dict.fromkeys(e[5] for e in edits if e[5] is not None))
        cond = None
        if conditions:
            cond_id = {c: n + 1 for n, c in enumerate(conditions)}
            ids = np.repeat(np.array([cond_id[e[5]] if e[5] is not None else 0 for e in edits], dtype=np.int64), sizes)
            cond = filled(0, ids > 0, ids, np.int64)
        edited = set(rows.tolist())
        compiled[name] = CompiledEdits(
            sae=name, latents=torch.from_numpy(union),
            mul=filled(1.0, code <= _SCALE, np.where(code == _SCALE, value, 0.0)),  # set, ablate: 0; scale: v
            add=filled(0.0, (code == _SET) | (is_add & ~normalize), value),
            add_norm=filled(0.0, norm_add, add_norm),
            cap=filled(math.inf, code == _CAP, value),
            edits_row=tuple(r in edited for r in range(n_rows)), preserve=preserve, cond=cond, conditions=tuple(conditions),
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
