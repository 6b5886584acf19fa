"""Shared pieces of the steering tests: random SAEs, JumpReLU latents written out by hand, probes
that capture a module's activations before and after the steering hooks, plan resolution."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from sae_runtime.plan import InterventionPlan
from sae_runtime.saes import SaeConfig, build_sae

D = 32  # d_model of the tiny LMs


def tiny_llama(directory, seed: int, num_layers: int = 3) -> torch.nn.Module:
    """A tiny Llama (d_model D) saved to ``directory`` and loaded back with ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from sae_runtime.demo.tiny_models import build_tiny_causal_lm

    path = build_tiny_causal_lm(directory, "llama", seed=seed, num_layers=num_layers, init_std=0.15)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def make_sae(arch: str, d_in: int, d_sae: int, seed: int, **cfg) -> torch.nn.Module:
    """A random SAE: matrices ~ N(0, 0.3^2), vectors ~ N(0, 0.1^2), thresholds ~ U(0, 0.2)."""
    sae = build_sae(SaeConfig(arch, d_in, d_sae, **cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return sae


@torch.no_grad()
def jumprelu_by_hand(sae, x: torch.Tensor) -> torch.Tensor:
    """f = relu(h) * (h > threshold), h = (x - b_dec) @ W_enc + b_enc: written out, not sae.encode."""
    h = torch.einsum("...d,df->...f", x - sae.b_dec, sae.W_enc) + sae.b_enc
    return torch.where(h > sae.threshold, h.clamp_min(0), torch.zeros_like(h))


@contextmanager
def probe(module: torch.nn.Module, inputs: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
    """A module's outputs (or first inputs) before and after the steering hook, which is prepended
    (U-Net outputs: their ``sample``): enter it inside the steering context."""
    first = lambda o: (o[0] if isinstance(o, tuple) else getattr(o, "sample", o)).detach().clone()  # noqa: E731
    log: dict[str, list[torch.Tensor]] = {"before": [], "after": []}
    if inputs:
        h1 = module.register_forward_pre_hook(lambda m, a: log["before"].append(first(a)), prepend=True)
        h2 = module.register_forward_pre_hook(lambda m, a: log["after"].append(first(a)))
    else:
        h1 = module.register_forward_hook(lambda m, a, o: log["before"].append(first(o)), prepend=True)
        h2 = module.register_forward_hook(lambda m, a, o: log["after"].append(first(o)))
    try:
        yield log
    finally:
        h1.remove()
        h2.remove()


def greedy(model, ids, mask, ctx, steps, hits=None) -> torch.Tensor:
    """Left-padded greedy decode with a KV cache under ``ctx``; the last-position logits of each
    forward (B, steps + 1, V). ``hits``: a list that gets ``ctx.stop_hits()`` after every decode step."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ctx.prefill(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        ctx.decode()
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
        if hits is not None:
            hits.append(ctx.stop_hits())
    return torch.stack(logits, 1)


def resolve(plan: InterventionPlan, saes, **kw) -> InterventionPlan:
    """``plan`` validated against attached SAEs (name -> AttachedSae), with their sites."""
    return plan.resolve({k: a.sae for k, a in saes.items()}, sae_sites={k: a.site for k, a in saes.items()}, **kw)
