"""Exact, per-row, batched SAE interventions and readouts inside a model's forward passes.

Semantics are those of reference.md section 4. Per row b of a batch, ``plans[b]`` edits latents
of some SAEs (set / ablate / scale / add / cap); with ``preserve_error`` (default) the hooked
activation becomes ``x + scale * sum over edited i of (f'_i - f_i) * decoder_row_i`` (only the
edited latents are encoded when the SAE is selective), without it ``x' = D(f')``. Rows with no
plan are left bit-identical (they are never written). Every row may have a different plan:
per SAE the union of edited latents is encoded once for the batch and per-row op tensors are
compiled once per context (see :mod:`.compile`), so the hot path has no Python loop over rows.

Order of operations at one hook site, per row b and position n (x = the activation there):

1. Condition latents: every condition leaf whose SAE sits at this site is encoded on x as it
   *enters* the site (before any edit here), for all rows; the values are kept for the rest of
   this forward, so edits at later sites of the same forward read them too
   (:meth:`HookSite.readable_from`: the same site, or an earlier one of the same position space:
   an earlier layer, or in one decoder layer resid_pre < mlp_out / mlp_io < resid_post; vision
   layers only from vision layers, U-Net blocks only from the same block). A tree is AND / OR
   over strict comparisons (:class:`~sae_runtime.plan.Condition`), a bool per (row, position).
2. Each SAE at the site, in the mapping's order: its latent edits (set / ablate / scale / add /
   cap), each masked by its condition where it has one: ``f' = where(cond, op(f), f)`` (latents
   encoded on x as it reaches this SAE, i.e. after earlier SAEs at the site); then its projection
   edits, one per latent in plan order, on x along u = W_dec[i] / ||W_dec[i]||, c = <x, u>:
   ``project_set v``: x' = x + (v - c) u, ``project_cap v``: x' = x + (min(c, v) - c) u.
3. The site's steering vectors, in plan order (d the vector): ``add v``: x' = x + v d, with
   ``normalize``: x' = x + v ||x|| d / ||d||; ``project_set`` / ``project_cap`` with u = d / ||d||.

Every edit is also weighted by the scope (token scope prompt / generated, valid mask, vision CLS,
U-Net mask, step window and CFG half) exactly as before. Projection and vector edits act on x
directly whatever ``preserve_error`` says (without the error term they act on the reconstruction
D(f') that replaced x); a condition gates the latent ops only, so without the error term a
position where it fails still becomes D(f). ``stop_when`` (text sites only) is evaluated on
``decode`` forwards at every valid position: :meth:`SteeringContext.stop_hits` gives, per plan
row, the first position where it holds and the first true leaf there; a plan with only
``stop_when`` reads but never writes its row.

Usage (causal LM, greedy, KV cache; ``ids``/``mask`` left-padded (B, T))::

    saes = {"res5": AttachedSae("res5", sae, HookSite.parse("blocks.5.hook_resid_post"))}
    plans = [InterventionPlan((LatentEdit("res5", EditOp.SET, (12,), 40.0),)).resolve({"res5": sae}), None]
    with SteeringContext(model, saes, plans, ReadoutSpec(("res5",), top_k=5)) as ctx:
        ctx.prefill(valid=mask)                       # prompt positions; padding ignored
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for _ in range(n_new):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            ctx.decode()                              # generated positions (all valid)
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos[:, -1:] + 1,
                        past_key_values=out.past_key_values, use_cache=True)
            pos = pos[:, -1:] + 1
    readouts = ctx.readouts()   # per row: {"res5": SaeReadout(prompt=..., generated=...)}

Under HF ``generate`` pass ``auto_phase=True`` instead: the context reads each call's KV cache
and attention mask. ``ctx.decode(rows=[...])`` maps a smaller batch (finished rows dropped) to
plan rows. U-Net: before each ``unet(...)`` call, ``ctx.set_unet_step(step, num_steps,
cfg_doubled)``; a CFG-doubled batch is [uncond rows, cond rows] (diffusers' order). LLaVA:
``ctx.prefill(mask)`` covers the vision tower and the language model's prompt in one forward.
"""

from sae_runtime.steering.attached import AttachedSae, check_widths
from sae_runtime.steering.compile import PROJECTION_OPS, CompiledEdits, compile_edits
from sae_runtime.steering.context import SteeringContext
from sae_runtime.steering.directions import DirectionTable, compile_projections, compile_vectors
from sae_runtime.steering.forward import PHASES
from sae_runtime.steering.readout import LatentPool, PhaseReadout, SaeReadout, TopLatents

__all__ = [
    "PHASES",
    "AttachedSae",
    "CompiledEdits",
    "DirectionTable",
    "PROJECTION_OPS",
    "PhaseReadout",
    "LatentPool",
    "SaeReadout",
    "SteeringContext",
    "TopLatents",
    "check_widths",
    "compile_edits",
    "compile_projections",
    "compile_vectors",
]
