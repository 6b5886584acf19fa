"""The plan table: each slot's plan compiled once on admission, gathered per forward by slot.

Like vLLM's per-request LoRA slots: a request's plan is written into its slot when it is
admitted (:meth:`PlanTable.assign`) and cleared when it leaves. Each forward names the slot of
every batch row in its :class:`~sae_runtime.engine.step.StepDescriptor`; the steering hooks
gather those slots' edit tables (cached while the running set stays the same, so steady decode
steps do no host-side work) and apply each row's edits under its own scope. One
:class:`~sae_runtime.steering.context.SteeringContext` in slot mode does the maths, so the engine,
the SDXL-Turbo backend and the benchmarks run the same hooks (and the same fast path).

Plan changes (admissions and releases) are staged and compiled together when the next forward
enters the table: a step that admits or retires many rows compiles the edit tables once, not
once per row (compiling costs O(rows x latents), so per-row compiles made a batch of 16 rows
with different plans pay 32 compiles per batch).
"""

from __future__ import annotations

from typing import Mapping

from sae_runtime.engine.readout import SlotReadouts
from sae_runtime.plan import InterventionPlan
from sae_runtime.steering import AttachedSae, SteeringContext
from torch import nn


class PlanTable:
    """Per-slot plans and readouts over ``n_slots`` slots of one model's SAEs."""

    def __init__(self, model: nn.Module, saes: Mapping[str, AttachedSae], n_slots: int) -> None:
        self.readouts = SlotReadouts(n_slots, {n: a.sae.d_sae for n, a in saes.items()})
        self.context = SteeringContext(model, saes, [None] * n_slots, recorder=self.readouts, hook_all=True)
        self._reads_dirty = False
        self._staged: dict[int, InterventionPlan | None] = {}  # slot -> plan, compiled on the next __enter__
        self.attached = False  # the context's hooks are on the model

    def assign(self, slot: int, plan: InterventionPlan | None, reads: Mapping[str, int]) -> None:
        """Admit a sequence into ``slot``: its validated plan (None = no edits) and what it reads
        (sae -> top-k per position, 0 = pooled statistics only)."""
        if plan is not None and plan.is_empty and plan.stop_when is None:
            plan = None
        self._staged[slot] = plan
        self.readouts.assign(slot, reads)
        self._reads_dirty = True

    def release(self, slot: int) -> None:
        self._staged[slot] = None
        self.readouts.release(slot)
        self._reads_dirty = True

    def stop_hits(self) -> dict[int, tuple[int, str, int, float]]:
        """Slots whose plan's ``stop_when`` held in the last decode forward: slot -> (position in
        that forward, leaf SAE, leaf latent, its value)."""
        return self.context.stop_hits()

    def _compile_staged(self) -> None:
        """Write the staged plans into their slots and compile the edit tables once."""
        changed = {s: p for s, p in self._staged.items() if p is not self.context.plans[s]}
        self._staged.clear()
        if changed:
            self.context.set_plans(changed)

    def __enter__(self) -> "PlanTable":
        """Compile staged plan changes; attach the hooks unless they still are from the last step."""
        self._compile_staged()
        if self._reads_dirty:
            self.context.set_reads(self.readouts.read_saes)
            self._reads_dirty = False
        if not self.attached:
            self.context.__enter__()
            self.attached = True
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # The hooks stay on the model between steps (attaching them costs ~0.3 ms per step on the
        # demo LM); a failed step, a call between steps and an idle engine detach them (detach()).
        if exc_type is not None:
            self.detach()

    def detach(self) -> None:
        """Take the hooks off the model (before other code runs it: calls between steps, idle)."""
        if self.attached:
            self.context.__exit__(None, None, None)
            self.attached = False


__all__ = ["PlanTable"]
