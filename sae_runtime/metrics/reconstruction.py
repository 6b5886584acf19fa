"""Reconstruction metrics of a dictionary on activations: L0, FVU, dead/dense shares, loss recovered.

A dictionary here is a :class:`~sae_runtime.saes.base.Sae`. Most reconstruct their input; a
transcoder (FF-KV) reads one part of the site's activation and reconstructs another. It says so
with a ``target_slice`` attribute (a slice of the last dimension); :func:`target_of` applies it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sae_runtime.saes.base import Sae
from sae_runtime.training.evaluation import fvu, l0, loss_recovered_on_texts

#: A latent firing on more than this share of tokens counts as dense (SAEBench's feature-density cut).
DENSE_SHARE = 0.1


def target_of(sae: Sae, x: Tensor) -> Tensor:
    """The part of x (..., d_in) the dictionary reconstructs (all of x unless it is a transcoder)."""
    sl = getattr(sae, "target_slice", None)
    return x if sl is None else x[..., sl]


def dictionary_outputs(sae: Sae, x: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(latents (N, d_sae), reconstruction of the target (N, d_target)) for rows x (N, d_in)."""
    fs, rs = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i : i + chunk].to(sae.W_dec.dtype)
            x_n, norm = sae.normalize(xb)
            f = sae.encode_normalized(x_n)
            fs.append(f)
            rs.append(target_of(sae, sae.decode(f, norm)))
    return torch.cat(fs), torch.cat(rs)


@dataclass(frozen=True)
class ReconstructionMetrics:
    l0: float  # mean nonzero latents per token
    fvu: float  # fraction of the target's variance unexplained
    dead_share: float  # latents that never fire on the evaluation tokens
    dense_share: float  # latents firing on more than DENSE_SHARE of them
    loss_recovered: float | None = None  # (L_zero - L_dict) / (L_zero - L_clean), error term dropped
    loss_clean: float | None = None
    loss_with_dict: float | None = None
    loss_zero_ablated: float | None = None
    n_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def firing_shares(latents: Tensor) -> Tensor:
    """Per latent, the share of rows (N, d_sae) where it is nonzero (d_sae,)."""
    return (latents != 0).double().mean(0)


def reconstruction_metrics(
    sae: Sae,
    x: Tensor,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    texts: Sequence[str] = (),
    hook_name: str | None = None,
) -> ReconstructionMetrics:
    """Metrics of ``sae`` on activations x (N, d_in) of its site; loss recovered too when a model,
    tokenizer and texts are given (the reconstruction replaces the site's activation, no error term)."""
    f, recon = dictionary_outputs(sae, x)
    shares = firing_shares(f)
    lr = None
    if model is not None and texts:
        lr = loss_recovered_on_texts(model, tokenizer, list(texts), hook_name or sae.cfg.hook_name, sae)
    return ReconstructionMetrics(
        l0=l0(f),
        fvu=fvu(target_of(sae, x).float(), recon.float()),
        dead_share=float((shares == 0).double().mean()),
        dense_share=float((shares > DENSE_SHARE).double().mean()),
        loss_recovered=None if lr is None else lr.fraction,
        loss_clean=None if lr is None else lr.clean,
        loss_with_dict=None if lr is None else lr.with_sae,
        loss_zero_ablated=None if lr is None else lr.zero_ablated,
        n_tokens=int(x.shape[0]),
    )
