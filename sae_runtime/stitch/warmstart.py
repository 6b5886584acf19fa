"""Training an SAE on B from the transferred weights versus from scratch (the paper's section 3.1).

Both runs use :class:`sae_runtime.training.trainer.SaeTrainer` with the same config, data order
and normalisation scale; the warm run only overwrites the initial weights. Held-out FVU is logged
every ``eval_every`` steps; the result says after how many steps (and FLOPs, counted with torch
FlopCounterMode on one training step, times the steps, plus the stitch fit for the warm run) each
run first reaches a target FVU (by default the scratch run's final FVU).

Loading a transferred SAE into the trainer: the trainer keeps decoder rows at unit norm in a
space scaled by ``s`` and subtracts ``b_dec`` from its input, so with row norms n_i of W_dec'
the trainable weights are W_dec = W_dec' / n_i, W_enc = W_enc' * n_i, b_dec = s b_dec',
b_enc = s n_i b_enc' + b_dec W_enc (exactly the transferred SAE for standard / jumprelu; for
TopK, scaling latent i by s n_i can change which k survive, so the warm start is close, not equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.saes.base import Sae
from sae_runtime.training.activations import ActivationStore
from sae_runtime.training.trainer import SaeTrainer, TrainConfig, normalization_scale


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)

    def first_reaching(self, target: float) -> int | None:
        return next((s for s, v in zip(self.steps, self.fvu) if v <= target), None)


def load_into_trainer(trainer: SaeTrainer, sae: Sae) -> None:
    """Overwrite the trainer's weights with ``sae`` (a transferred SAE, ``apply_b_dec_to_input``
    False, standard / jumprelu / topk); see the module doc for the mapping."""
    if sae.cfg.apply_b_dec_to_input or sae.cfg.rescale_acts_by_decoder_norm:
        raise InvalidArgument("expected a transferred SAE (no b_dec on the input, no decoder-norm rescale)", field="sae")
    arch = {"jumprelu": "jumprelu", "batchtopk": "jumprelu"}.get(sae.cfg.architecture, sae.cfg.architecture)
    if arch != trainer.cfg.architecture or sae.d_sae != trainer.cfg.d_sae or sae.d_in != trainer.d_in:
        raise InvalidArgument(f"SAE ({sae.cfg.architecture}, {sae.d_in}x{sae.d_sae}) does not match the trainer", field="sae")
    s, t = trainer.scale, trainer.sae
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1).clamp_min(1e-12)
        t.W_dec.copy_(sae.W_dec / norms[:, None])
        t.W_enc.copy_(sae.W_enc * norms)
        t.b_dec.copy_(sae.b_dec * s)
        t.b_enc.copy_(sae.b_enc * norms * s + t.b_dec @ t.W_enc)
        if arch == "jumprelu":
            t.log_threshold.copy_((sae.threshold * norms * s).clamp_min(1e-6).log())
    trainer.optimizer = torch.optim.Adam(t.parameters(), lr=trainer.cfg.lr)


def _step_flops(trainer: SaeTrainer, batch: Tensor) -> int:
    """FLOPs of one training step, counted on a throwaway copy of the trainer."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(trainer)
    counter = FlopCounterMode(display=False)
    with counter:
        probe.step(batch)
    return int(counter.get_total_flops())


def run(store: ActivationStore, cfg: TrainConfig, eval_acts: Tensor, *, init: Sae | None = None, eval_every: int = 100) -> tuple[Curve, int, SaeTrainer]:
    """(held-out FVU curve, FLOPs per step, the trained trainer) of one run, from ``init`` or from
    scratch. From scratch it is the run :func:`train_sae` makes with the same config and data."""
    probe_rows = next(store.batches(min(8192, store.n_tokens), shuffle=True, seed=cfg.seed))
    trainer = SaeTrainer(cfg, store.d_in, scale=normalization_scale(probe_rows), init_batch=probe_rows)
    if init is not None:
        load_into_trainer(trainer, init)
    batches = store.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + 1, loop=True)
    curve = Curve([0], [trainer.evaluate(eval_acts).fvu])
    flops = 0
    for step in range(1, cfg.steps + 1):
        batch = next(batches)
        if step == 1:
            flops = _step_flops(trainer, batch)
        trainer.step(batch)
        if step % eval_every == 0 or step == cfg.steps:
            curve.steps.append(step)
            curve.fvu.append(trainer.evaluate(eval_acts).fvu)
    return curve, flops, trainer


def compare(store: ActivationStore, cfg: TrainConfig, eval_acts: Tensor, transferred: Sae, *, stitch_flops: int = 0, eval_every: int = 100, target: float | None = None) -> tuple[dict[str, Any], SaeTrainer]:
    """Scratch vs transferred-init runs; steps and FLOPs to reach ``target`` FVU (default: the
    scratch run's final FVU). ``saved_fraction`` = 1 - warm FLOPs / scratch FLOPs (None when a run
    never reaches the target). Also returns the scratch run's trainer (the native SAE)."""
    scratch, flops, native = run(store, cfg, eval_acts, eval_every=eval_every)
    warm, _, _ = run(store, cfg, eval_acts, init=transferred, eval_every=eval_every)
    goal = scratch.fvu[-1] if target is None else target
    s_steps, w_steps = scratch.first_reaching(goal), warm.first_reaching(goal)
    s_flops = None if s_steps is None else s_steps * flops
    w_flops = None if w_steps is None else w_steps * flops + stitch_flops
    return {
        "target_fvu": goal,
        "scratch": {"steps": s_steps, "flops": s_flops, "curve": {"step": scratch.steps, "fvu": scratch.fvu}},
        "transferred_init": {"steps": w_steps, "flops": w_flops, "curve": {"step": warm.steps, "fvu": warm.fvu}},
        "flops_per_step": flops,
        "stitch_flops": stitch_flops,
        "saved_fraction": None if s_flops is None or w_flops is None else 1.0 - w_flops / s_flops,
    }, native


__all__ = ["Curve", "compare", "load_into_trainer", "run"]
