"""The step descriptor the hooks read, and the step runner that runs a step's forwards.

A step runs at most two forwards: the *prefill* of the rows admitted this step (left-padded
prompts in a fresh cache, which then joins the running cache) and one *decode* forward of every
running row (its last sampled token). Measured here, a combined forward (new rows' prompts packed
beside running rows' single tokens) saves nothing on CPU: the decode forward of 16 rows costs
about as much as one row, and the padding a packed forward needs costs more (README, engine).

:class:`StepDescriptor` says, for every token of a forward, which row (slot) it belongs to, its
phase (``prefill`` or ``decode``) and its position. The steering hooks read only this (through
:meth:`StepDescriptor.apply`), never the KV cache or transformers' internals.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor, nn

from sae_runtime.engine.kv import SlotKvCache
from sae_runtime.engine.plans import PlanTable
from sae_runtime.engine.request import PreparedText, SequenceRun


@dataclass(frozen=True)
class StepDescriptor:
    """One forward: ``slots[b]`` is the slot of batch row b; every token of the forward is in
    ``phase``; ``positions`` (B, T) are the tokens' position ids and ``valid`` (B, T) marks real
    tokens (left padding False; None = all real)."""

    phase: str
    slots: tuple[int, ...]
    positions: Tensor
    valid: Tensor | None = None

    def apply(self, plans: PlanTable) -> None:
        plans.context.set_phase(self.phase, self.valid, rows=self.slots)


class ModalityPlugin(Protocol):
    """What a modality adds to the text engine (LLaVA: the image)."""

    def admit(self, rows: Sequence[tuple[SequenceRun, PreparedText]], plans: PlanTable) -> None:
        """Work done once when rows are admitted (LLaVA: encode their images under vision edits)."""

    def prefill_inputs(self, rows: Sequence[SequenceRun]) -> dict[str, Any]:
        """Extra keyword arguments of the prefill forward of ``rows`` (in batch order)."""


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids (B, T), attention_mask (B, T) long, position_ids (B, T) for left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


class StepRunner:
    """Runs the forwards of a step over ``kv``'s rows, with the plan table's hooks attached."""

    def __init__(self, model: nn.Module, plans: PlanTable, kv: SlotKvCache, pad_id: int,
                 plugin: ModalityPlugin | None = None) -> None:
        self.model, self.plans, self.kv, self.pad_id, self.plugin = model, plans, kv, pad_id, plugin
        self.device = next(model.parameters()).device
        self._keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        # Under sdpa a boolean 4D mask means "may attend", and a decode step's is the rows' padding
        # mask as (B, 1, 1, L): handed over ready-made, transformers returns it as is instead of
        # building it every forward (about 6% of a 16-row decode forward of the demo LM; same logits).
        self._ready_decode_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"

    def prefill(self, rows: Sequence[SequenceRun], prompts: Sequence[Sequence[int]]) -> Tensor:
        """Prefill ``rows`` (prompt ids each); they join the cache. Returns last-position logits (b, V)."""
        ids, mask, positions = left_pad(prompts, self.pad_id, self.device)
        slots = tuple(r.slot for r in rows)
        StepDescriptor("prefill", slots, positions, mask.bool()).apply(self.plans)
        extra = self.plugin.prefill_inputs(rows) if self.plugin is not None else {}
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=new_cache(self.model),
                             use_cache=True, **self._keep_last, **extra)
        self.kv.add(out.past_key_values, mask, positions[:, -1] + 1, slots)
        return out.logits[:, -1, :]

    def decode(self, tokens: Tensor) -> Tensor:
        """One decode forward of every cached row, ``tokens`` (B,) in ``kv.slots`` order. Returns logits (B, V)."""
        cache, mask, positions = self.kv.decode_inputs()
        StepDescriptor("decode", tuple(self.kv.slots), positions).apply(self.plans)
        if self._ready_decode_mask:
            mask = mask.bool()[:, None, None, :]
        with torch.no_grad():
            out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, **self._keep_last)
        return out.logits[:, -1, :]


__all__ = ["ModalityPlugin", "StepDescriptor", "StepRunner", "left_pad"]
