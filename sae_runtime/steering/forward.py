"""ForwardState: what the next forward computes, and which batch entries and positions each edit covers.

A :class:`~sae_runtime.steering.context.SteeringContext` holds one and delegates to it. The state is
the phase (``prefill`` / ``decode`` / ``denoise``), the valid mask, the plan row of each batch entry
(text and vision batches), and the U-Net step and CFG layout. From it the state maps a hook's batch
to plan rows and CFG halves, says whether a row's scope covers this forward, keys the per-forward
caches, and builds the per-position weights of an edit (valid mask, CLS-only vision scope, U-Net
spatial masks). Host-side bookkeeping only; the tensors it builds are cached per state.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import CfgHalf, InterventionPlan, TokenScope, VisionScope
from sae_runtime.sites import HookSite, SiteKind
from sae_runtime.steering.compile import EditGroup
from sae_runtime.steering.directions import DirectionGroup

PHASES = ("prefill", "decode", "denoise")


class ForwardState:
    """The next forward's phase, valid mask, row maps and U-Net step, over ``plans`` (one per plan row).

    ``plans`` is the context's own list (rows' plans are replaced in place, its length never
    changes); it is read for each row's scope. Attributes (read by the context): ``phase``,
    ``valid`` ((B, T) bool or None), ``rows`` / ``vision_rows`` (plan row of each text / vision
    batch entry, or None for 0..B-1), ``step``, ``num_steps``, ``cfg_doubled``.
    """

    def __init__(self, plans: list[InterventionPlan | None]) -> None:
        self.plans = plans
        self.n_rows = len(plans)
        self.num_steps = 0  # set by set_unet_step (informational: no edit reads it)
        self._weights: dict[tuple, Tensor | None] = {}  # (id(group),) for text, (id, n_pos, grid) else
        self._readout_rows: dict[tuple, tuple[tuple[int, ...], tuple[int, ...], Tensor | None]] = {}
        self.set_phase("prefill")

    def set_phase(
        self, phase: str, valid: Tensor | None = None, *, rows: Sequence[int] | None = None,
        vision_rows: Sequence[int] | None = None,
    ) -> None:
        """See :meth:`SteeringContext.set_phase`; drops the text weights (the valid mask changes)."""
        if phase not in PHASES:
            raise InvalidArgument(f"unknown phase {phase!r} (expected one of {PHASES})", field="phase")
        self.phase = phase
        self.valid = None if valid is None else valid.to(dtype=torch.bool)
        self.rows = None if rows is None else tuple(int(r) for r in rows)
        self.vision_rows = None if vision_rows is None else tuple(int(r) for r in vision_rows)
        self.step, self.cfg_doubled = 0, False
        self._weights = {k: w for k, w in self._weights.items() if len(k) > 1}

    def set_unet_step(self, step: int, num_steps: int, cfg_doubled: bool) -> None:
        """See :meth:`SteeringContext.set_unet_step` (the caller has set the ``denoise`` phase)."""
        self.step, self.num_steps, self.cfg_doubled = int(step), int(num_steps), bool(cfg_doubled)

    def clear_weights(self) -> None:
        """Forget every cached weight (the edit groups they were keyed by are gone)."""
        self._weights.clear()

    # -- per-forward row selection (host side, cached by the caller) ----------------------------
    def row_map(self, site: HookSite, n_batch: int) -> tuple[list[int], list[str]]:
        """Plan row and CFG half ("cond"/"uncond") of each hook-batch entry."""
        if site.kind is SiteKind.UNET_BLOCK:
            if self.cfg_doubled:
                if n_batch != 2 * self.n_rows:
                    raise InvalidArgument(f"CFG-doubled U-Net batch of {n_batch} for {self.n_rows} plans",
                                          field="batch")
                return ([j % self.n_rows for j in range(n_batch)],
                        ["uncond" if j < self.n_rows else "cond" for j in range(n_batch)])
        elif site.kind is SiteKind.VISION_LAYER and self.vision_rows is not None:
            if len(self.vision_rows) != n_batch or not all(0 <= r < self.n_rows for r in self.vision_rows):
                raise InvalidArgument(f"vision batch of {n_batch} but {len(self.vision_rows)} vision_rows",
                                      field="vision_rows")
            return list(self.vision_rows), ["cond"] * n_batch
        elif site.is_text and self.rows is not None:
            if len(self.rows) != n_batch or not all(0 <= r < self.n_rows for r in self.rows):
                raise InvalidArgument(f"site {site.name} sees a batch of {n_batch} but rows is {self.rows}",
                                      field="rows")
            return list(self.rows), ["cond"] * n_batch
        if n_batch != self.n_rows:
            raise InvalidArgument(f"site {site.name} sees a batch of {n_batch} for {self.n_rows} plans", field="batch")
        return list(range(n_batch)), ["cond"] * n_batch

    def active(self, site: HookSite, row: int, half: str) -> bool:
        """Whether plan row ``row``'s scope covers this forward at ``site`` (CFG half ``half``)."""
        scope = self.plans[row].scope  # type: ignore[union-attr]
        if site.is_text:
            return scope.tokens is TokenScope.ALL or (scope.tokens is TokenScope.PROMPT) == (self.phase == "prefill")
        if site.kind is SiteKind.UNET_BLOCK:
            end = scope.step_end if scope.step_end is not None else float("inf")
            return scope.step_start <= self.step < end and scope.cfg_half in (CfgHalf.BOTH, CfgHalf(half))
        return True

    def state_key(self, site: HookSite, n_batch: int) -> tuple:
        """What the row selection at ``site`` depends on in this forward (a cache key)."""
        if site.is_text:
            return ("text", self.phase, n_batch, self.rows)
        if site.kind is SiteKind.UNET_BLOCK:
            return ("unet", self.step, self.cfg_doubled, n_batch)
        return ("vision", self.vision_rows, n_batch)

    def weight(self, site: HookSite, g: EditGroup | DirectionGroup, n_pos: int,
               grid: tuple[int, int] | None) -> Tensor | None:
        """Per-position weight (R, N, 1) of the edit, or None when every position is fully in scope."""
        if site.is_text:
            if self.valid is None:
                return None
            key: tuple = (id(g),)  # text weights are dropped by set_phase (the valid mask changes)
        else:
            key = (id(g), n_pos, grid)
        if key in self._weights:
            return self._weights[key]
        dtype = g.dtype
        w: Tensor | None = None
        if site.is_text:
            w = self.valid_for(site, n_pos, g.rows.device).index_select(0, g.rows).unsqueeze(-1).to(dtype)
        elif site.kind is SiteKind.VISION_LAYER:
            cls = [self.plans[r].scope.vision is VisionScope.CLS for r in g.plan_rows]  # type: ignore[union-attr]
            if any(cls):
                w = torch.ones(len(cls), n_pos, 1, dtype=dtype, device=g.rows.device)
                w[torch.tensor(cls, device=g.rows.device), 1:] = 0
        else:
            masks = [self.plans[r].scope.mask for r in g.plan_rows]  # type: ignore[union-attr]
            if any(m is not None for m in masks):
                w = torch.stack([
                    torch.ones(grid, dtype=dtype) if m is None else _downsample(m, grid).to(dtype) for m in masks
                ]).reshape(len(masks), -1, 1).to(g.rows.device)
        self._weights[key] = w
        return w

    def valid_for(self, site: HookSite, n_pos: int, device: torch.device) -> Tensor:
        """The valid mask's last ``n_pos`` columns (B, n_pos) on ``device``."""
        valid = self.valid
        if valid.shape[1] < n_pos:  # type: ignore[union-attr]
            raise InvalidArgument(f"valid mask covers {valid.shape[1]} positions, "  # type: ignore[union-attr]
                                  f"site {site.name} sees {n_pos}", field="valid")
        return valid[:, valid.shape[1] - n_pos:].to(device)  # type: ignore[union-attr]

    def readout_rows(self, site: HookSite, n_batch: int,
                     device: torch.device) -> tuple[tuple[int, ...], Tensor | None]:
        """The plan rows a readout at ``site`` records (the cond entries, in batch order) and the
        index (on ``device``) of their batch entries, or None when that is every entry."""
        key = self.state_key(site, n_batch)
        sel = self._readout_rows.get(key)
        if sel is None:
            plan_rows, halves = self.row_map(site, n_batch)
            batch = [j for j, h in enumerate(halves) if h == "cond"]
            idx = None if batch == list(range(n_batch)) else torch.tensor(batch, device=device)
            sel = (tuple(batch), tuple(plan_rows[j] for j in batch), idx)
            self._readout_rows[key] = sel
        _, rows, idx = sel
        return rows, idx


def _downsample(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """An (H, W) mask in [0, 1] averaged down (or interpolated up) to the block's grid."""
    m = mask.detach().float()[None, None]
    if m.shape[-2] >= grid[0] and m.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(m, grid)[0, 0]
    return F.interpolate(m, size=grid, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
