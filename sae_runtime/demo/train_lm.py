"""Train the concept world's small Llama-architecture causal LM on CPU, deterministically.

The model reads :func:`world.training_texts` (stories and fact documents), one document per row,
right-padded. Training stops when greedy fact accuracy on intact-context questions reaches the
target (checked every ``eval_every`` steps on a fixed probe set) or after ``max_steps``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from sae_runtime.demo import world


@dataclass(frozen=True)
class LmTrainConfig:
    """Model size and optimisation settings. ``max_seconds`` bounds wall time (0 = no bound)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 128
    init_std: float = 0.1
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    max_steps: int = 800
    min_steps: int = 600
    eval_every: int = 200
    eval_items: int = 200
    target_accuracy: float = 0.97
    fact_fraction: float = 0.6
    answer_weight: float = 3.0
    max_seconds: float = 0.0
    threads: int = 2


def make_model(vocab_size: int, tok: PreTrainedTokenizerBase, cfg: LmTrainConfig) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _batch(tok: PreTrainedTokenizerBase, texts: Sequence[str], answer_weight: float) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``<bos> text <eos>``; per-token loss weights (answers upweighted)."""
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    weights = torch.zeros(len(ids), width)
    answer_id, period_id = tok.convert_tokens_to_ids(["answer", "."])
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = torch.tensor(row)
        weights[r, : len(row)] = 1.0
        in_answer = False
        for c, t in enumerate(row):
            if in_answer:  # "answer : the fox is red ." -> weight the answer sentence
                weights[r, c] = answer_weight
                in_answer = t != period_id
            if c >= 1 and row[c - 1] == answer_id:
                in_answer = True
    return {"input_ids": input_ids, "weights": weights}


def weighted_lm_loss(model: LlamaForCausalLM, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    mask = (weights > 0).long()
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    target, w = input_ids[:, 1:], weights[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (nll * w.reshape(-1)).sum() / w.sum()


@torch.no_grad()
def greedy_generate(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 4,
    batch_size: int = 128,
) -> list[str]:
    """Greedy continuations (decoded words, specials dropped), stopping at ``<eos>``.

    Prompts are left-padded; positions come from the attention mask so padding changes nothing.
    """
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, padding_side="left")
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(tok.decode(row, skip_special_tokens=True) for row in new)
    return out


def fact_accuracy(model: LlamaForCausalLM, tok: PreTrainedTokenizerBase, items: Sequence[world.FactItem]) -> float:
    """Share of items whose greedy completion states the queried fact's value."""
    completions = greedy_generate(model, tok, [it.prompt for it in items], max_new_tokens=2)
    return sum(world.is_correct(it, c) for it, c in zip(items, completions)) / max(len(items), 1)


def train_lm(
    tok: PreTrainedTokenizerBase,
    cfg: LmTrainConfig = LmTrainConfig(),
    log: Callable[[str], None] = print,
) -> tuple[LlamaForCausalLM, dict]:
    """Train from scratch; returns the model (eval mode) and metrics (steps, loss, accuracy, seconds)."""
    torch.set_num_threads(cfg.threads)
    model = make_model(len(tok), tok, cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    data_rng = random.Random(cfg.seed + 1)
    probe = world.fact_items(cfg.eval_items, seed=cfg.seed + 2, mix=[("intact", 0.0)])
    t0 = time.perf_counter()
    acc, loss_ema, step = 0.0, float("nan"), 0
    for step in range(1, cfg.max_steps + 1):
        texts = world.training_texts(cfg.batch_size, seed=data_rng.randrange(2**31), fact_fraction=cfg.fact_fraction)
        batch = _batch(tok, texts, cfg.answer_weight)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        loss = weighted_lm_loss(model, batch["input_ids"], batch["weights"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
        out_of_time = cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            acc = fact_accuracy(model, tok, probe)
            model.train()
            log(f"lm step {step:5d}  loss {loss_ema:.3f}  fact_acc {acc:.3f}  {time.perf_counter() - t0:.0f}s")
            if (acc >= cfg.target_accuracy and step >= cfg.min_steps) or out_of_time:
                break
    model.eval()
    metrics = {
        "steps": step,
        "train_loss": round(loss_ema, 4),
        "probe_fact_accuracy": round(acc, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "config": asdict(cfg),
    }
    return model, metrics
