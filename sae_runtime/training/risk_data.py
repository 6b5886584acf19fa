"""Pooled SAE latents of labelled (prompt, completion) pairs, the risk probe's training data.

Each row is tokenized as ``prompt ids (with the tokenizer's special tokens) + completion ids
(without)``, the same ids a causal LM sees when it generates the completion after the prompt.
Prompt pools cover the prompt positions, generated pools the completion positions; padding is
excluded. All SAEs are read in one forward pass per batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.risk import PooledStats, ProbeLayout, pool_masked
from sae_runtime.saes import Sae
from sae_runtime.training import site_hooks


@dataclass(frozen=True)
class LabelledCompletion:
    prompt: str
    completion: str
    label: int  # 1 = hallucinated


def read_jsonl(path: str | Path) -> list[LabelledCompletion]:
    """Rows ``{"prompt": str, "completion": str, "label": 0|1 (or bool)}``; FormatError names the line."""
    rows = []
    p = Path(path)
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            label = obj["label"]
            if isinstance(label, bool):
                label = int(label)
            if label not in (0, 1) or not isinstance(obj["prompt"], str) or not isinstance(obj.get("completion", ""), str):
                raise ValueError("prompt/completion must be strings and label 0 or 1")
            rows.append(LabelledCompletion(obj["prompt"], obj.get("completion", ""), int(label)))
        except (ValueError, KeyError, TypeError) as err:
            raise FormatError(f"line {n}: {err}", field=str(p)) from None
    if not rows:
        raise FormatError("no rows", field=str(p))
    return rows


def encode_pair(tokenizer: Any, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """(ids, number of prompt positions), truncated to max_length (prompt kept first)."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) if completion else []
    ids = (prompt_ids + completion_ids)[:max_length]
    return ids, min(len(prompt_ids), len(ids))


def collect_pooled(
    model: nn.Module,
    tokenizer: Any,
    saes: Mapping[str, Sae],
    rows: Sequence[LabelledCompletion],
    *,
    hook_names: Mapping[str, str] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = True,
) -> dict[str, PooledStats]:
    """Pooled stats per SAE, each tensor (N, d_sae), for ``rows`` in order.

    ``hook_names`` overrides an SAE's own ``cfg.hook_name``.
    """
    hooks = {}
    for name, sae in saes.items():
        hook = (hook_names or {}).get(name) or sae.cfg.hook_name
        if not hook:
            raise InvalidArgument(f"SAE {name!r} records no hook site: give one", field=f"hook_names.{name}")
        hooks[name] = hook
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, list[PooledStats]] = {name: [] for name in saes}
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="pooling", disable=not progress, unit="batch"):
            batch = [encode_pair(tokenizer, r.prompt, r.completion, max_length) for r in rows[start : start + batch_size]]
            t = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (t - len(i)) for i, _ in batch], device=device)
            lengths = torch.tensor([len(i) for i, _ in batch], device=device)
            n_prompt = torch.tensor([n for _, n in batch], device=device)
            pos = torch.arange(t, device=device)[None, :]
            valid = pos < lengths[:, None]
            captured: dict[str, Tensor] = {}
            handles = [site_hooks.attach(model, hook, _grabber(captured, name)) for name, hook in hooks.items()]
            try:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=valid.long())
            finally:
                for h in handles:
                    h.remove()
            for name, sae in saes.items():
                with torch.no_grad():
                    lat = sae.encode(captured[name].to(sae.W_dec.dtype)).float()
                out[name].append(pool_masked(lat, valid & (pos < n_prompt[:, None]), valid & (pos >= n_prompt[:, None])))
    finally:
        model.train(was_training)
    return {name: PooledStats(*(torch.cat([getattr(s, f) for s in stats]).cpu() for f in ("prompt_mean", "prompt_max", "gen_mean", "gen_max"))) for name, stats in out.items()}


def _grabber(store: dict[str, Tensor], name: str):
    def grab(x: Tensor) -> None:
        store[name] = x.detach()

    return grab


def layout_of(saes: Mapping[str, Sae]) -> ProbeLayout:
    return ProbeLayout(tuple((name, sae.d_sae) for name, sae in saes.items()))
