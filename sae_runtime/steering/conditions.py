"""Conditions: latent values read at a site as the activation enters it, and the trees over them.

Per forward, each site first encodes the condition leaves whose SAE sits there (only those
latents, on the unedited activation) and keeps them as :class:`LeafValues` for the rest of that
forward, so edits at this site or later sites (see :meth:`HookSite.readable_from`) can read them.
A tree becomes a bool mask (B, N) per hook-batch row and position; an edit's mask gates its op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import Compare, Condition, InterventionPlan
from sae_runtime.saes.base import Sae


@dataclass(frozen=True)
class LeafValues:
    """Latents ``latents`` (L,) of one SAE at every hook-batch row and position: ``values`` (B, N, L)."""

    latents: Tensor
    values: Tensor
    column: Mapping[int, int]


def edit_conditions(plan: InterventionPlan | None) -> Iterable[Condition]:
    """Every condition an edit of ``plan`` carries (latent and vector edits)."""
    if plan is None:
        return ()
    return [e.condition for e in (*plan.edits, *plan.vectors) if e.condition is not None]


def leaves_by_sae(conditions: Iterable[Condition]) -> dict[str, tuple[int, ...]]:
    """SAE name -> the latents (sorted) that the leaves of ``conditions`` read."""
    out: dict[str, set[int]] = {}
    for c in conditions:
        for leaf in c.leaves():
            out.setdefault(leaf.sae, set()).add(int(leaf.latent))  # type: ignore[arg-type]
    return {k: tuple(sorted(v)) for k, v in out.items()}


def leaves_of(codes: Tensor, latents: Tensor) -> LeafValues:
    """The leaf values ``latents`` (L,) from a full encoding ``codes`` (B, N, d_sae) of the unedited x."""
    return LeafValues(latents, codes.index_select(-1, latents), {int(i): j for j, i in enumerate(latents.tolist())})


def encode_leaves(sae: Sae, latents: Tensor, x: Tensor, encoder: Sae | None = None) -> LeafValues:
    """The latents ``latents`` (L,) of ``sae`` on activation x (B, N, d_in), before any edit.
    ``encoder``: ``sae.restrict(latents)`` (selective SAEs), read instead of gathering columns."""
    xs = x if x.dtype == sae.W_dec.dtype else x.to(sae.W_dec.dtype)
    x_n, _ = sae.normalize(xs)
    if encoder is not None:
        values = encoder.encode_normalized(x_n)
    elif sae.selective:
        values = sae.encode_selected_normalized(x_n, latents)
    else:
        values = sae.encode_normalized(x_n).index_select(-1, latents)
    return LeafValues(latents, values, {int(i): j for j, i in enumerate(latents.tolist())})


def _leaf_value(leaf: Condition, values: Mapping[str, LeafValues], n_batch: int) -> Tensor:
    got = values.get(leaf.sae)
    if got is None or int(leaf.latent) not in got.column:  # type: ignore[arg-type]
        raise InvalidArgument(f"condition on SAE {leaf.sae!r} read before its site ran in this forward",
                              field="plan.condition")
    v = got.values[..., got.column[int(leaf.latent)]]  # type: ignore[arg-type]
    if v.shape[0] != n_batch:
        raise InvalidArgument(f"condition on SAE {leaf.sae!r} was read on a batch of {v.shape[0]}, not {n_batch}",
                              field="plan.condition")
    return v


def leaf_holds(leaf: Condition, v: Tensor) -> Tensor:
    """Whether the leaf's strict comparison holds for latent values ``v``."""
    return v > leaf.threshold if Compare(leaf.compare) is Compare.ABOVE else v < leaf.threshold


def evaluate(c: Condition, values: Mapping[str, LeafValues], n_batch: int) -> Tensor:
    """The tree's truth (B, N) bool at every hook-batch row and position."""
    if c.is_leaf:
        return leaf_holds(c, _leaf_value(c, values, n_batch))
    kids = [evaluate(k, values, n_batch) for k in (c.all_of or c.any_of)]
    out = kids[0]
    for k in kids[1:]:
        out = (out & k) if c.all_of else (out | k)
    return out


def condition_masks(conditions: Sequence[Condition], values: Mapping[str, LeafValues], rows: Tensor, all_rows: bool,
                    n_batch: int) -> Tensor:
    """(R, N, 1 + C) bool for hook-batch ``rows``: column 0 all True, column c ``conditions[c-1]``."""
    cols = [evaluate(c, values, n_batch) for c in conditions]
    cols = [m if all_rows else m.index_select(0, rows) for m in cols]
    return torch.stack([torch.ones_like(cols[0]), *cols], dim=-1)


def first_hit(c: Condition, values: Mapping[str, LeafValues], j: int, valid: Tensor | None, n_batch: int
              ) -> tuple[int, str, int, float] | None:
    """For hook-batch row ``j``: (position, leaf sae, leaf latent, its value) at the first valid
    position where ``c`` holds, naming the first leaf (tree order) whose comparison holds there."""
    holds = evaluate(c, values, n_batch)[j]
    if valid is not None:
        holds = holds & valid[j]
    where = holds.nonzero()
    if where.numel() == 0:
        return None
    pos = int(where[0, 0])
    for leaf in c.leaves():
        v = _leaf_value(leaf, values, n_batch)[j, pos]
        if bool(leaf_holds(leaf, v)):
            return pos, leaf.sae, int(leaf.latent), float(v)  # type: ignore[arg-type]
    raise AssertionError("a true tree has a true leaf")  # pragma: no cover


def stop_hits(plans: Sequence[InterventionPlan | None], stop_rows: Sequence[int], values: Mapping[str, LeafValues],
              rows: Sequence[int] | None, valid: Tensor | None) -> dict[int, tuple[int, str, int, float]]:
    """Plan row -> :func:`first_hit` of its ``stop_when`` over the last forward's leaf ``values``.

    ``rows``: plan row of each hook-batch entry (None = 0..B-1); ``valid`` (B, >= N) bool mask
    whose last N columns mark real positions (None = all real). Rows absent from the forward or
    without a hit are left out.
    """
    if not values or not stop_rows:
        return {}
    first = next(iter(values.values())).values
    n_batch, n_pos = first.shape[:2]
    batch_of = {r: j for j, r in enumerate(rows)} if rows is not None else {r: r for r in range(n_batch)}
    if valid is not None:
        valid = valid[:, valid.shape[1] - n_pos:].to(first.device)
    hits = {}
    for r in stop_rows:
        if r in batch_of:
            hit = first_hit(plans[r].stop_when, values, batch_of[r], valid,  # type: ignore[union-attr, arg-type]
                            n_batch)
            if hit is not None:
                hits[r] = hit
    return hits


__all__ = ["LeafValues", "condition_masks", "edit_conditions", "encode_leaves", "evaluate", "first_hit", "leaf_holds",
           "leaves_by_sae", "stop_hits"]
