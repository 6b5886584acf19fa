"""Random, deterministic SAEs and risk probes to go with the tiny models (tests, soak, benchmarks).

Their weights mean nothing; they exercise loading, hooks, edits, readouts and risk scoring with
real files in the project's formats.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sae_runtime.risk import ProbeLayout, RiskProbe
from sae_runtime.saes.base import Sae, SaeConfig, build_sae


def random_sae(d_in: int, d_sae: int, hook: str, *, seed: int, labels: Mapping[str, int] | None = None,
               architecture: str = "standard", k: int | None = None, n_concepts: int = 0) -> Sae:
    """An SAE of ``architecture`` (default standard ReLU) with Gaussian weights scaled by 1/sqrt(d_in),
    encoder biases ~ N(0, 0.1²) where it has them, and optional concept ``labels`` (label -> latent
    index). ``k``: latents kept for top-k-style architectures; ``n_concepts``: a G-SAE's reserved latents."""
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SaeConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name=hook, k=k, n_concepts=n_concepts))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        if isinstance(getattr(sae, "b_enc", None), torch.Tensor):
            sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
    if labels:
        sae.labels = dict(labels)
    return sae


def random_probe(sae_name: str, d_sae: int, *, seed: int, labels: Mapping[str, int] | None = None) -> RiskProbe:
    """A risk probe over one SAE: identity standardisation, coefficients ~ N(0, 0.2²), intercepts -0.3."""
    g = torch.Generator().manual_seed(seed)
    layout = ProbeLayout(((sae_name, d_sae),))
    n = layout.n_features("final")
    return RiskProbe(
        layout=layout,
        feature_mean=torch.zeros(n),
        feature_std=torch.ones(n),
        prompt_coef=torch.randn(layout.n_features("prompt"), generator=g) * 0.2,
        prompt_intercept=-0.3,
        final_coef=torch.randn(n, generator=g) * 0.2,
        final_intercept=-0.3,
        latent_labels={sae_name: dict(labels or {})},
    )


__all__ = ["random_probe", "random_sae"]
