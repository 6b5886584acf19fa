"""Exact, per-row, batched SAE interventions and readouts inside a model's forward passes.

Semantics are those of reference.md section 4. Per row b of a batch, ``plans[b]`` edits latents
of some SAEs (set / ablate / scale / add / cap); with ``preserve_error`` (default) the hooked
activation becomes ``x + scale * sum over edited i of (f'_i - f_i) * decoder_row_i`` (only the
edited latents are encoded when the SAE is selective), without it ``x' = D(f')``. Rows with no
plan are left bit-identical (they are never written). Every row may have a different plan:
per SAE the union of edited latents is encoded once for the batch and per-row op tensors are
compiled once per context (see :mod:`.compile`), so the hot path has no Python loop over rows.

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

from sae_runtime.steering.compile import CompiledEdits, compile_edits
from sae_runtime.steering.context import PHASES, AttachedSae, SteeringContext, check_widths
from sae_runtime.steering.readout import LatentPool, PhaseReadout, SaeReadout, TopLatents

__all__ = [
    "PHASES",
    "AttachedSae",
    "CompiledEdits",
    "PhaseReadout",
    "LatentPool",
    "SaeReadout",
    "SteeringContext",
    "TopLatents",
    "check_widths",
    "compile_edits",
]
