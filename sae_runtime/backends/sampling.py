"""Vectorised next-token selection for a batch of rows, each with its own parameters and generator.

Per decode step the caller hands over the logits of the last position, (B, V), and gets back one
token id per row. Everything is a batched tensor operation except drawing the random numbers: each
row owns a CPU ``torch.Generator`` seeded from its request and draws exactly one uniform number
per step in which it samples. A row's tokens therefore depend only on its own logits and its own
seed, never on what else shares the batch, and the same seed gives the same draws on CPU and GPU.

Processing order (each step, for every row):

1. repetition penalty (HF / CTRL semantics) over every token seen so far, prompt included:
   ``l = l * p if l < 0 else l / p``;
2. frequency penalty (OpenAI semantics) over the generated tokens only: ``l -= f * count``;
3. temperature: ``l / t`` (rows with ``t == 0`` are greedy and skip this and the next steps);
4. top-k, then top-p (nucleus) truncation: removed tokens get ``-inf``;
5. greedy rows take the argmax of the penalised logits; sampling rows draw by inverse CDF.

Log-probs reported to users (:meth:`SlotSampler.step`) are ``log_softmax`` of the logits after
steps 1-3 (penalties and temperature, temperature 0 counted as 1) and BEFORE top-k/top-p
truncation, so every token has a finite log-prob.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sae_runtime.backends.types import SamplingParams


def new_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator for one request, seeded with ``seed`` (a fresh random seed when None).

    Returns the generator and the seed actually used (so a caller can report or reuse it).
    """
    if seed is None:
        seed = secrets.randbits(63)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g, int(seed)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF repetition penalty. logits (B, V) float; seen (B, V) bool; penalty (B,), 1 = off.

    For every seen token: negative logits are multiplied by the penalty, others divided by it.
    """
    p = penalty.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_frequency_penalty(logits: Tensor, counts: Tensor, penalty: Tensor) -> Tensor:
    """OpenAI frequency penalty: logits (B, V) minus penalty (B,) times generated counts (B, V)."""
    return logits - penalty.to(logits.dtype).unsqueeze(1) * counts.to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide each row by its temperature (B,); rows with temperature 0 (greedy) are divided by 1."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t.to(logits.dtype).unsqueeze(1)


def truncate_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's ``top_k`` (B,) largest logits (0 = keep all); the rest become -inf.

    Ties with the k-th largest value are kept, as in HF's TopKLogitsWarper.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def truncate_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus truncation: keep the smallest set of most likely tokens whose probability reaches
    ``top_p`` (B,) (1 = keep all); at least one token always survives. Others become -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    remove_sorted = mass_before >= top_p.to(probs.dtype).unsqueeze(1)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_inverse_cdf(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Draw one token per row from softmax(logits) (B, V) using uniforms (B,) in [0, 1).

    The token is the first index whose cumulative probability exceeds ``u * total``; tokens with
    zero probability (-inf logits) can never be drawn.
    """
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp(max=logits.shape[-1] - 1)


@dataclass
class StepOutput:
    """One decode step's selection: token ids (B,) and the reporting log-probs (B, V) float32."""

    tokens: Tensor
    logprobs: Tensor


class SlotSampler:
    """Selects the next token for the rows of a forward, each row with its own SamplingParams.

    State lives per *slot* (an engine slot holds one running sequence at a time): its parameters,
    generator, and what the penalties need: ``seen`` (S, V) bool, tokens in the prompt or
    generated so far, and ``counts`` (S, V), how often each token was generated. A forward's rows
    name their slots, so rows may join and leave between steps without touching other rows' state.
    """

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.generators: list[torch.Generator | None] = [None] * n_slots
        self.temperature = torch.zeros(n_slots, **f32)
        self.top_p = torch.ones(n_slots, **f32)
        self.top_k = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.repetition_penalty = torch.ones(n_slots, **f32)
        self.frequency_penalty = torch.zeros(n_slots, **f32)
        self.seen = torch.zeros(n_slots, vocab_size, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(n_slots, vocab_size, dtype=torch.int32, device=self.device)

    def assign(self, slot: int, params: SamplingParams, generator: torch.Generator, prompt_ids: Sequence[int]) -> None:
        """Give ``slot`` to a new sequence: its parameters, generator and prompt (for the repetition penalty)."""
        self.generators[slot] = generator
        self.temperature[slot] = params.temperature
        self.top_p[slot] = params.top_p
        self.top_k[slot] = params.top_k
        self.repetition_penalty[slot] = params.repetition_penalty
        self.frequency_penalty[slot] = params.frequency_penalty
        self.seen[slot] = False
        self.counts[slot] = 0
        if prompt_ids:
            self.seen[slot, torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True

    def step(self, logits: Tensor, slots: Sequence[int] | None = None) -> StepOutput:
        """Pick one token for each row of last-position logits (B, V); ``slots[i]`` is row i's slot
        (default 0..B-1). Each sampling row draws exactly one number from its own generator."""
        slots = list(range(logits.shape[0])) if slots is None else list(slots)
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        temperature = self.temperature.index_select(0, idx)
        x = logits.float()
        repetition = self.repetition_penalty.index_select(0, idx)
        if bool((repetition != 1).any()):
            x = apply_repetition_penalty(x, self.seen.index_select(0, idx), repetition)
        frequency = self.frequency_penalty.index_select(0, idx)
        if bool((frequency != 0).any()):
            x = apply_frequency_penalty(x, self.counts.index_select(0, idx), frequency)
        scaled = apply_temperature(x, temperature)
        tokens = scaled.argmax(dim=-1)
        draw = [i for i, s in enumerate(slots) if float(self.temperature[s]) > 0]
        if draw:
            truncated = truncate_top_p(truncate_top_k(scaled, self.top_k.index_select(0, idx)), self.top_p.index_select(0, idx))
            uniforms = torch.zeros(len(slots), dtype=torch.float32)
            for i in draw:
                uniforms[i] = torch.rand((), generator=self.generators[slots[i]])
            sampled = sample_inverse_cdf(truncated, uniforms.to(self.device))
            tokens = torch.where(temperature > 0, sampled, tokens)
        self.seen[idx, tokens] = True
        self.counts[idx, tokens] += 1
        return StepOutput(tokens=tokens, logprobs=scaled.log_softmax(dim=-1))


def top_logprobs(logprobs: Tensor, tokens: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob of the chosen token (B,), and the top-n log-probs (B, n) with their ids (B, n)."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    values, ids = logprobs.topk(max(n, 0), dim=-1) if n > 0 else (logprobs[:, :0], tokens.new_zeros(tokens.shape[0], 0))
    return chosen, values, ids


__all__ = [
    "SlotSampler",
    "StepOutput",
    "apply_frequency_penalty",
    "apply_repetition_penalty",
    "apply_temperature",
    "new_generator",
    "sample_inverse_cdf",
    "top_logprobs",
    "truncate_top_k",
    "truncate_top_p",
]
