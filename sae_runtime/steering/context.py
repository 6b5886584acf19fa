"""SteeringContext: apply per-row intervention plans and gather readouts inside a model's forwards.

The context owns the plans, their compiled edit tables, the hooks and the hot path (encode, edit,
decode at each hooked site). What the next forward computes, and which batch entries and positions
each edit covers, is a :class:`~sae_runtime.steering.forward.ForwardState` (``ctx.fwd``); attached
SAEs and the checks of plans against them are in :mod:`sae_runtime.steering.attached`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from sae_runtime.plan import InterventionPlan, ReadoutSpec
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.steering.attached import AttachedSae, check_plan, check_vector_widths, check_widths
from sae_runtime.steering.compile import EditGroup, apply_ops, compile_edits, make_group
from sae_runtime.steering.conditions import (
    LeafValues, condition_masks, edit_conditions, encode_leaves, leaves_by_sae, leaves_of, stop_hits,
)
from sae_runtime.steering.directions import (
    DirectionGroup, DirectionTable, apply_directions, compile_projections, compile_vectors, make_direction_group,
)
from sae_runtime.steering.forward import PHASES, ForwardState
from sae_runtime.steering.readout import AccumulatingRecorder, ReadoutRecorder, SaeReadout

__all__ = ["PHASES", "AttachedSae", "SteeringContext", "check_widths"]


class SteeringContext:
    """Hooks that apply ``plans[b]`` to row b of every forward run inside ``with ctx:``.

    ``saes``: the model's SAEs by name (only those a plan edits or the readout names are hooked).
    ``plans``: one per batch row (plan row); None or an empty plan leaves that row bit-identical.
    Plans must be validated (``InterventionPlan.resolve``). ``readout``: SAEs to read on every row.
    Before each forward, tell the context what it computes: :meth:`set_phase` (causal LM / LLaVA)
    or :meth:`set_unet_step` (U-Net). See the package docstring for an example.

    ``auto_phase`` (causal LM / LLaVA, e.g. under HF ``generate``): a pre-hook on ``model`` sets
    the phase of each call itself: ``prefill`` when the call has no (or an empty) KV cache, else
    ``decode``; the valid mask is the call's ``attention_mask`` (last T columns).

    ``recorder``: where readouts go (default: an :class:`AccumulatingRecorder` over the plan rows,
    read back with :meth:`readouts`). The engine passes its per-slot recorder, hooks every SAE
    site (``hook_all``), and changes rows' plans with :meth:`set_plans` and the SAEs
    to read with :meth:`set_reads`.
    """

    def __init__(
        self,
        model: nn.Module,
        saes: Mapping[str, AttachedSae],
        plans: Sequence[InterventionPlan | None],
        readout: ReadoutSpec | None = None,
        *,
        auto_phase: bool = False,
        recorder: ReadoutRecorder | None = None,
        hook_all: bool = False,
    ) -> None:
        self.model = model
        self.auto_phase = auto_phase
        self.saes = dict(saes)
        self.plans = list(plans)
        self.n_rows = len(self.plans)
        for n, plan in enumerate(self.plans):
            check_plan(plan, self.saes, f"plans[{n}].sae")
        self.readout = readout if readout is not None and readout.saes else None
        if self.readout is not None:
            self.readout.check({k: a.sae for k, a in self.saes.items()})
        self.recorder: ReadoutRecorder = recorder if recorder is not None else AccumulatingRecorder(
            self.n_rows, self.readout.top_k if self.readout else 1)
        self._read = set(self.readout.saes) if self.readout else set()
        self._hook_all = hook_all
        self._handles: list = []  # the auto-phase pre-hook
        self._site_handles: dict[HookSite, object] = {}  # attached sites (while entered)
        self._entered = False
        self._checked: set = set()  # SAE names and (site, vector width) already width-checked
        self._leaf_values: dict[str, LeafValues] = {}  # this forward's condition latents, by SAE
        self._hits: dict[int, tuple[int, str, int, float]] | None = None
        self._groups: dict[tuple, list[EditGroup]] = {}
        self._dir_groups: dict[tuple, DirectionGroup | None] = {}
        self._restricted: dict[str, Sae | None] = {}
        self.fwd = ForwardState(self.plans)  # shares self.plans (rows are replaced in place)
        self._by_site: dict[HookSite, list[str]] = {}
        self._compile()
        self.set_phase("prefill")

    # -- plans and reads (the engine changes them per slot) -------------------------------------
    def _compile(self) -> None:
        saes = {k: a.sae for k, a in self.saes.items()}
        self.compiled = compile_edits(self.plans, saes)
        self.projections: dict[str, DirectionTable] = compile_projections(self.plans, saes)
        self.vector_tables: dict[HookSite, DirectionTable] = compile_vectors(self.plans)
        self._edit_leaves = leaves_by_sae(c for p in self.plans for c in edit_conditions(p))
        self._stop_rows = tuple(r for r, p in enumerate(self.plans) if p is not None and p.stop_when is not None)
        self._stop_leaves = leaves_by_sae(self.plans[r].stop_when for r in self._stop_rows)  # type: ignore[misc]
        self._leaf_plan: dict[tuple, list[tuple[str, Tensor]]] = {}
        self._groups.clear()
        self._dir_groups.clear()
        self._restricted.clear()
        self.fwd.clear_weights()
        self._plan_sites()

    def _plan_sites(self) -> None:
        """Sites to hook, each with its SAEs in the mapping's order (re-attached while entered)."""
        need = (set(self.compiled) | set(self.projections) | self._read | set(self._edit_leaves)
                | set(self._stop_leaves))
        by_site: dict[HookSite, list[str]] = {}
        for name, att in self.saes.items():
            if self._hook_all or name in need:
                by_site.setdefault(att.site, []).append(name)
        for site in self.vector_tables:
            by_site.setdefault(site, [])
        self._by_site = by_site
        if self._entered:
            self._sync_hooks()

    def set_plans(self, plans: Mapping[int, InterventionPlan | None]) -> None:
        """Give plan rows new (validated) plans, row -> plan; the edit tables are compiled again, once."""
        for row, plan in plans.items():
            check_plan(plan, self.saes, "plan.sae")
        for row, plan in plans.items():
            self.plans[row] = plan
        self._compile()

    def set_reads(self, saes: frozenset[str] | set[str]) -> None:
        """The SAEs whose latents the next forwards encode for every row and hand to the recorder."""
        self._read = set(saes)
        if not self._hook_all:
            self._plan_sites()

    # -- what the next forward computes (kept in self.fwd) --------------------------------------
    def set_phase(
        self, phase: str, valid: Tensor | None = None, *, rows: Sequence[int] | None = None,
        vision_rows: Sequence[int] | None = None,
    ) -> None:
        """Declare the next forward(s): ``prefill`` (prompt positions) or ``decode`` (generated ones).

        ``valid``: (B, T) attention mask of the tokens this forward computes (left padding = 0), or
        the whole (B, past + T) attention mask (its last T columns are used); padding positions
        are neither edited nor read. None = all valid. ``rows``: plan row of each entry of the
        forward's batch when it is not 0..B-1 (e.g. finished rows dropped during decoding);
        ``vision_rows``: the same for the vision tower's batch (images).
        """
        self.fwd.set_phase(phase, valid, rows=rows, vision_rows=vision_rows)
        self._leaf_values = {}
        self._hits = None

    def prefill(self, valid: Tensor | None = None, *, rows: Sequence[int] | None = None,
                vision_rows: Sequence[int] | None = None) -> None:
        """Shorthand for ``set_phase("prefill", valid, rows=..., vision_rows=...)``."""
        self.set_phase("prefill", valid, rows=rows, vision_rows=vision_rows)

    def decode(self, valid: Tensor | None = None, *, rows: Sequence[int] | None = None) -> None:
        """Shorthand for ``set_phase("decode", valid, rows=...)``."""
        self.set_phase("decode", valid, rows=rows)

    def set_unet_step(self, step: int, num_steps: int, cfg_doubled: bool) -> None:
        """Declare the next U-Net forward: denoising ``step`` of ``num_steps``.

        ``cfg_doubled``: the batch is [uncond rows, cond rows] (diffusers' order), 2 * B entries.
        A batch that is not doubled counts as the cond half.
        """
        self.set_phase("denoise")
        self.fwd.set_unet_step(step, num_steps, cfg_doubled)

    # -- hooks --------------------------------------------------------------------------------
    def __enter__(self) -> "SteeringContext":
        self._entered = True
        try:
            if self.auto_phase:
                self._handles.append(self.model.register_forward_pre_hook(self._auto_phase_hook, with_kwargs=True))
            self._sync_hooks()
        except BaseException:
            self._remove()
            raise
        return self

    def _sync_hooks(self) -> None:
        """Attach the sites the plans and reads need, detach the others. Widths are checked once
        per SAE (and per vector site and width), when first hooked, not on every enter."""
        for site in [s for s in self._site_handles if s not in self._by_site]:
            self._site_handles.pop(site).remove()  # type: ignore[attr-defined]
        unchecked = {n: self.saes[n] for names in self._by_site.values() for n in names if n not in self._checked}
        check_widths(self.model, unchecked)
        self._checked.update(unchecked)
        check_vector_widths(self.model, self.vector_tables, self._checked)
        for site in self._by_site:
            if site not in self._site_handles:
                self._site_handles[site] = site.attach(self.model, self._site_fn(site))

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _auto_phase_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        past = 0 if cache is None else (cache.get_seq_length() if hasattr(cache, "get_seq_length") else 1)
        self.set_phase("prefill" if past == 0 else "decode", kwargs.get("attention_mask"))

    def _remove(self) -> None:
        for handle in [*self._handles, *self._site_handles.values()]:
            handle.remove()  # type: ignore[attr-defined]
        self._handles.clear()
        self._site_handles.clear()
        self._entered = False

    def _site_fn(self, site: HookSite):
        def fn(x: Tensor, grid: tuple[int, int] | None) -> Tensor | None:
            if torch.is_grad_enabled():
                with torch.no_grad():
                    return fn(x, grid)
            # 1) condition latents of the SAEs here, on the activation as it enters the site.
            entry: dict[str, Tensor] = {}  # full encodings of the entering x, for SAEs read anyway
            for name, latents, encoder in self._leaves_at(site):
                sae = self.saes[name].sae
                if encoder is None and not sae.selective and name in self._read:
                    entry[name] = sae.encode(x if x.dtype == sae.W_dec.dtype else x.to(sae.W_dec.dtype))
                    self._leaf_values[name] = leaves_of(entry[name], latents)
                else:
                    self._leaf_values[name] = encode_leaves(sae, latents, x, encoder)
                self._hits = None
            # 2) each SAE's latent edits, then its projection edits; 3) the site's vectors.
            changed = False
            for name in self._by_site.get(site, ()):
                # While x is still the entering activation, a read reuses the condition's encoding.
                new = self._apply_sae(site, name, x, grid, None if changed else entry.get(name))
                if new is not None:
                    x, changed = new, True
                if name in self.projections:
                    new = self._apply_directions(site, name, self.projections[name], x, grid)
                    if new is not None:
                        x, changed = new, True
            if site in self.vector_tables:
                new = self._apply_directions(site, site, self.vector_tables[site], x, grid)
                if new is not None:
                    x, changed = new, True
            return x if changed else None

        return fn

    def _leaves_at(self, site: HookSite) -> list[tuple[str, Tensor, Sae | None]]:
        """(SAE name, latents, the SAE restricted to them or None) to encode at ``site`` in this
        phase (stop leaves on decode forwards only)."""
        decode = self.fwd.phase == "decode"
        key = (site, decode)
        plan = self._leaf_plan.get(key)
        if plan is None:
            plan = []
            for name, att in self.saes.items():
                lat = set(self._edit_leaves.get(name, ())) | (set(self._stop_leaves.get(name, ())) if decode else set())
                if att.site == site and lat:
                    idx = torch.tensor(sorted(lat), dtype=torch.long, device=att.sae.W_dec.device)
                    plan.append((name, idx, att.sae.restrict(idx) if att.sae.selective else None))
            self._leaf_plan[key] = plan
        return plan

    def _masks(self, g: EditGroup | DirectionGroup, n_batch: int) -> Tensor | None:
        if g.cond is None:
            return None
        return condition_masks(g.conditions, self._leaf_values, g.rows, g.all_rows, n_batch)

    def _apply_directions(self, site: HookSite, key: object, table: DirectionTable, x: Tensor,
                          grid: tuple[int, int] | None) -> Tensor | None:
        """x after the projection / vector slots of ``table`` on the rows that have them (or None)."""
        state = (key, *self.fwd.state_key(site, x.shape[0]))
        if state not in self._dir_groups:
            plan_rows, halves = self.fwd.row_map(site, x.shape[0])
            batch = [j for j, r in enumerate(plan_rows) if table.rows[r] and self.fwd.active(site, r, halves[j])]
            dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            self._dir_groups[state] = make_direction_group(table, batch, [plan_rows[j] for j in batch], x.shape[0],
                                                           x.device, dtype) if batch else None
        g = self._dir_groups[state]
        if g is None:
            return None
        xg = x if g.all_rows else x.index_select(0, g.rows)
        new = apply_directions(g, xg.to(g.dtype), self.fwd.weight(site, g, x.shape[1], grid),
                               self._masks(g, x.shape[0]))
        new = new.to(x.dtype)
        return new if g.all_rows else x.index_copy(0, g.rows, new)

    # -- stop conditions ------------------------------------------------------------------------
    def stop_hits(self) -> dict[int, tuple[int, str, int, float]]:
        """Rows whose ``stop_when`` held in the last forward, if it was a ``decode`` forward:
        plan row -> (position index among that forward's T positions, leaf SAE, leaf latent, its
        value), at the first valid position where the condition holds, naming the first leaf (in
        tree order) whose comparison holds there. Cleared by :meth:`set_phase`. Moves data to the CPU.
        """
        if self._hits is None:
            decode = self.fwd.phase == "decode" and bool(self._stop_rows)
            self._hits = (stop_hits(self.plans, self._stop_rows, self._leaf_values, self.fwd.rows, self.fwd.valid)
                          if decode else {})
        return dict(self._hits)

    # -- the hot path -------------------------------------------------------------------------
    def _apply_sae(self, site: HookSite, name: str, x: Tensor, grid: tuple[int, int] | None,
                   codes: Tensor | None = None) -> Tensor | None:
        """x after ``name``'s latent edits (None: unchanged); records its readout. ``codes``: the
        SAE's encoding of this very x when already computed (``sae.encode(x)``)."""
        groups = self._groups_for(site, name, x.shape[0]) if name in self.compiled else []
        read = name in self._read
        if not groups and not read:
            return None
        if (not read and len(groups) == 1 and groups[0].lean and self.fwd.valid is None and site.is_text
                and x.dtype == groups[0].decoder_rows.dtype):
            # Decode-step fast path (same maths as below, fewest ops): every row edited, every
            # position in scope, error term kept, no input normalisation, restricted encoder.
            g = groups[0]
            f_u = g.encoder.encode_normalized(x)  # type: ignore[union-attr]
            f_new = g.set_to if g.set_to is not None else apply_ops(g, f_u, None)
            df = (f_new - f_u).reshape(-1, f_u.shape[-1])
            return torch.addmm(x.reshape(-1, x.shape[-1]), df, g.decoder_rows).view(x.shape)
        sae = self.saes[name].sae
        xs = x if x.dtype == sae.W_dec.dtype else x.to(sae.W_dec.dtype)
        f_full = f_after = None
        if read:
            f_full = codes if codes is not None else sae.encode(xs)
            f_after = f_full
        out = x
        for g in groups:
            xg = xs if g.all_rows else xs.index_select(0, g.rows)
            x_n, norm = sae.normalize(xg)
            fg_full = None
            if f_full is not None:
                fg_full = f_full if g.all_rows else f_full.index_select(0, g.rows)
                f_u = fg_full.index_select(-1, g.latents)
            elif g.replace or not sae.selective:
                fg_full = sae.encode_normalized(x_n)
                f_u = fg_full.index_select(-1, g.latents)
            elif g.encoder is not None:
                f_u = g.encoder.encode_normalized(x_n)
            else:
                f_u = sae.encode_selected_normalized(x_n, g.latents)
            x_norm = x_n.norm(dim=-1, keepdim=True) if g.add_norm is not None else None
            f_new = apply_ops(g, f_u, x_norm, self._masks(g, x.shape[0]))
            weight = self.fwd.weight(site, g, x.shape[1], grid)
            if weight is not None:
                f_new = torch.lerp(f_u, f_new.expand_as(f_u), weight)
            if g.replace:
                f_edit = fg_full.index_copy(-1, g.latents, f_new.expand_as(f_u))
                recon = sae.decode(f_edit, norm)
                new = recon if weight is None else torch.lerp(xg, recon, weight)
            elif norm is None and xg.dtype == f_u.dtype:
                # x + (f' - f) @ rows in one addmm on (R * N, d) views.
                d = xg.shape[-1]
                df = (f_new - f_u).reshape(-1, f_u.shape[-1])
                new = torch.addmm(xg.reshape(-1, d), df, g.decoder_rows).view(xg.shape)
            else:
                delta = (f_new - f_u) @ g.decoder_rows
                if norm is not None:
                    delta = delta * norm.scale
                new = xg + delta
            new = new.to(x.dtype)
            out = new if g.all_rows else out.index_copy(0, g.rows, new)
            if read:
                edited = f_edit if g.replace else fg_full.index_copy(-1, g.latents, f_new.expand_as(f_u))
                if g.all_rows:
                    f_after = edited
                else:
                    f_after = f_full.clone() if f_after is f_full else f_after
                    f_after.index_copy_(0, g.rows, edited)
        if read:
            self._record(site, name, f_full, f_after, grid)
        return out if groups else None

    # -- per-forward edit groups (host side, cached by ForwardState.state_key) ------------------
    def _groups_for(self, site: HookSite, name: str, n_batch: int) -> list[EditGroup]:
        key = (name, *self.fwd.state_key(site, n_batch))
        groups = self._groups.get(key)
        if groups is None:
            compiled, sae = self.compiled[name], self.saes[name].sae
            if name not in self._restricted:
                latents = compiled.latents.to(sae.W_dec.device)
                self._restricted[name] = sae.restrict(latents) if sae.selective and len(latents) else None
            plan_rows, halves = self.fwd.row_map(site, n_batch)
            groups = []
            for replace in (False, True):
                batch = [j for j, r in enumerate(plan_rows) if compiled.edits_row[r]
                         and compiled.preserve[r] != replace and self.fwd.active(site, r, halves[j])]
                if batch:
                    groups.append(make_group(compiled, sae, batch, [plan_rows[j] for j in batch], n_batch, replace,
                                             encoder=None if replace else self._restricted[name]))
            self._groups[key] = groups
        return groups

    # -- readouts -----------------------------------------------------------------------------
    def _record(self, site: HookSite, name: str, before: Tensor, after: Tensor, grid: tuple[int, int] | None) -> None:
        rows, idx = self.fwd.readout_rows(site, before.shape[0], before.device)
        if idx is not None:
            before, after = before.index_select(0, idx), (after if after is before else after.index_select(0, idx))
        valid = None
        if site.is_text and self.fwd.valid is not None:
            valid = self.fwd.valid_for(site, before.shape[1], before.device)
            if idx is not None:
                valid = valid.index_select(0, idx)
        self.recorder.add(name, self.fwd.phase, rows, before, after, valid, grid)

    def readouts(self) -> list[dict[str, SaeReadout]]:
        """Per plan row: SAE name -> its readout (phases it was seen in). Moves data to the CPU.
        Only with the default recorder."""
        return self.recorder.readouts(self.readout.saes if self.readout else ())  # type: ignore[union-attr]
