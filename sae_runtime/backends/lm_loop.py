"""The batched decode loop of the causal-LM backend: left-padded prefill, then KV-cached decode steps.

Rows are independent sequences sharing one forward per step. Each row has its own prompt, plan
(applied by a :class:`~sae_runtime.steering.context.SteeringContext` through its ``prefill`` /
``decode`` phases), sampling parameters and generator (:class:`~.sampling.BatchSampler`). Rows
finish on their own (end-of-sequence id, stop string, length); a finished row keeps its batch slot
but is marked invalid, so it is neither edited nor read, and draws no random numbers.

Positions, as HF ``generate`` computes them: a left-padded prompt of ``L`` tokens has position ids
``0 .. L-1`` (padding gets 0 and is masked out), and each decode step adds one.

Readouts of a generated token are those at the position where that token is the INPUT (so a
token's latents describe the token itself, like the prompt's). They are known one forward after
the token was sampled; a row that needs readouts (``RowSpec.read_last``) therefore runs its last
kept token through the model once more when it stops on a stop string or on length (an
end-of-sequence id is not a kept token, so then nothing is left to read).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from sae_runtime.backends.completion import RowText
from sae_runtime.backends.sampling import BatchSampler, top_logprobs
from sae_runtime.backends.types import SamplingParams


@dataclass
class RowSpec:
    """What one batch row generates from. ``prompt_ids`` are the row's prompt tokens (no padding)."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    logprobs: int = 0
    read_last: bool = False


@dataclass
class RowProgress:
    """A row's state: its text bookkeeping and how many kept tokens have been run through the model."""

    spec: RowSpec
    text: RowText
    n_read: int = 0
    flushed: bool = False

    @property
    def finished(self) -> bool:
        """No forward will change this row any more."""
        return self.text.done and (not self.spec.read_last or self.n_read >= len(self.text.records))

    @property
    def ready(self) -> int:
        """Kept tokens whose record is final (readouts included when the row reads them)."""
        return self.n_read if self.spec.read_last else len(self.text.records)


@dataclass
class LoopState:
    """What the loop yields after each forward (the same object, updated in place)."""

    rows: list[RowProgress]
    forwards: int = 0
    prompt_len: int = 0  # padded prompt length T
    extra: dict[str, Any] = field(default_factory=dict)


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
        if p:
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def decode_loop(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[RowSpec],
    *,
    steering: Any,
    eos_ids: frozenset[int],
    pad_id: int,
    vocab_size: int,
) -> Iterator[LoopState]:
    """Run the rows to completion, yielding the shared :class:`LoopState` after every forward.

    ``steering`` is an entered SteeringContext (or None): the loop calls its ``prefill(valid)``
    and ``decode(valid)`` before each forward. The caller reads results from the final state.
    """
    device = next(model.parameters()).device
    state = LoopState(
        rows=[RowProgress(r, RowText(tokenizer, r.params.stop, r.params.max_new_tokens, eos_ids)) for r in rows]
    )
    sampler = BatchSampler([r.params for r in rows], [r.generator for r in rows], [r.prompt_ids for r in rows], vocab_size, device)
    input_ids, attention, positions = left_pad([r.prompt_ids for r in rows], pad_id, device)
    state.prompt_len = input_ids.shape[1]
    n_logprobs = max(r.logprobs for r in rows)
    cache = _new_cache(model)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}

    if steering is not None:
        steering.prefill(attention.bool())
    # Grad mode is set per forward, never held across a yield: a streaming consumer may resume
    # this generator on another thread, and grad/inference modes are thread-local.
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True, **keep_last)
    cache = out.past_key_values
    state.forwards = 1
    last_pos = positions[:, -1:]
    logits = out.logits[:, -1, :]
    for p in state.rows:
        p.n_read = 0
    while True:
        sampling = [not p.text.done for p in state.rows]
        with torch.no_grad():
            step = sampler.step(logits, sampling)
        _push_tokens(state, step.tokens, step.logprobs, sampling, n_logprobs, tokenizer)
        feed = [sampling[i] and not p.finished for i, p in enumerate(state.rows)]
        yield state
        if not any(feed):
            return
        feed_t = torch.tensor(feed, device=device)
        next_ids = torch.where(feed_t, step.tokens, torch.full_like(step.tokens, pad_id)).unsqueeze(1)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        last_pos = last_pos + 1
        if steering is not None:
            steering.decode(feed_t.unsqueeze(1))
        with torch.no_grad():
            out = model(input_ids=next_ids, attention_mask=attention, position_ids=last_pos, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        state.forwards += 1
        logits = out.logits[:, -1, :]
        for i, p in enumerate(state.rows):
            if feed[i]:
                p.n_read = len(p.text.records)


def _push_tokens(state: LoopState, tokens: Tensor, logprobs: Tensor, sampling: Sequence[bool], n_logprobs: int, tokenizer: Any) -> None:
    chosen = top_vals = top_ids = None
    if n_logprobs > 0:
        chosen, top_vals, top_ids = (t.tolist() for t in top_logprobs(logprobs, tokens, n_logprobs))
    ids = tokens.tolist()
    for i, p in enumerate(state.rows):
        if not sampling[i]:
            continue
        n = p.spec.logprobs
        if n > 0:
            top = tuple((tokenizer.decode([t]), float(v)) for t, v in zip(top_ids[i][:n], top_vals[i][:n]))
            p.text.push(ids[i], float(chosen[i]), top)
        else:
            p.text.push(ids[i])


def _new_cache(model: nn.Module) -> Any:
    """A fresh DynamicCache for the model (None lets the model create its own)."""
    try:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    except Exception:  # older/other cache constructors: let the model build one on the first call
        return None


__all__ = ["LoopState", "RowProgress", "RowSpec", "decode_loop", "left_pad"]
