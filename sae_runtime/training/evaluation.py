"""SAE quality metrics: L0, fraction of variance unexplained, and LM loss recovered.

loss recovered = (L_zero - L_sae) / (L_zero - L_clean), where L_clean is the model's next-token
loss, L_sae the loss with the SAE's reconstruction spliced in at the site, and L_zero the loss with
the site's activation replaced by zeros. 1 = the SAE loses nothing; 0 = as bad as deleting the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_runtime.training import site_hooks


def l0(latents: Tensor) -> float:
    """Mean number of nonzero latents per row; latents (N, d_sae)."""
    return float((latents != 0).sum(-1).float().mean())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, x (N, d_in)."""
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total.clamp_min(1e-30))


def lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> float:
    """Mean next-token cross-entropy (nats) over positions whose input and target are not padding."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits, targets = logits[:, :-1].float(), input_ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)
    if attention_mask is None:
        return float(ce.mean())
    keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    return float(ce[keep].mean())


def lm_loss_with(model: nn.Module, hook_name: str, replace: Callable[[Tensor], Tensor], input_ids: Tensor, attention_mask: Tensor | None = None) -> float:
    """:func:`lm_loss` with the activation at ``hook_name`` replaced by ``replace(activation)``."""
    handle = site_hooks.attach(model, hook_name, replace)
    try:
        return lm_loss(model, input_ids, attention_mask)
    finally:
        handle.remove()


@dataclass(frozen=True)
class LossRecovered:
    clean: float  # L_clean (nats per token)
    with_sae: float  # L_sae
    zero_ablated: float  # L_zero
    fraction: float  # (L_zero - L_sae) / (L_zero - L_clean)


def loss_recovered(
    model: nn.Module,
    input_ids: Tensor,
    hook_name: str,
    sae: Callable[[Tensor], Tensor],
    attention_mask: Tensor | None = None,
) -> LossRecovered:
    """Loss recovered by ``sae`` (any callable x (..., d_in) -> reconstruction, e.g. a Sae module)
    spliced in at ``hook_name``, on a batch of token ids (B, T)."""
    was_training = model.training
    model.eval()
    try:
        clean = lm_loss(model, input_ids, attention_mask)
        with torch.no_grad():
            spliced = lm_loss_with(model, hook_name, lambda x: sae(x).to(x.dtype), input_ids, attention_mask)
        zero = lm_loss_with(model, hook_name, torch.zeros_like, input_ids, attention_mask)
    finally:
        model.train(was_training)
    return LossRecovered(clean, spliced, zero, (zero - spliced) / (zero - clean))


def loss_recovered_on_texts(model: nn.Module, tokenizer: Any, texts: list[str], hook_name: str, sae: Callable[[Tensor], Tensor], max_length: int = 128) -> LossRecovered:
    """:func:`loss_recovered` on texts tokenized as one right-padded batch."""
    from sae_runtime.training.activations import tokenize

    batch = tokenize(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    return loss_recovered(model, batch["input_ids"].to(device), hook_name, sae, batch["attention_mask"].to(device))
