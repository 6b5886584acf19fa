"""SAELens ``normalize_activations: covariance_whitening`` checkpoints: fold the whitening in.

A mid-training SAELens (>= 6.5x) checkpoint of an SAE trained on whitened activations saves
``activation_scaler.json`` (``{"scaling_factor": s | null, "has_whitening": true}``) and, beside it,
``activation_whitening.safetensors`` with ``mean`` (d_in,), ``matrix`` M (d_in, d_in) and
``inverse_matrix`` M^-1 (d_in, d_in). The SAE reads z = (x * s - mean) @ M and its reconstruction
maps back as x_hat = (z_hat @ M^-1 + mean) / s.

The loader folds as SAELens' trainer does at the end of training (``fold_activation_whitening``;
a scaling factor, which SAELens never sets together with whitening, is folded after it, as the
outer map), so the loaded SAE reads and writes raw activations and its latents equal the
checkpoint's latents (up to float rounding; checked against SAELens' own scaler in
tests/fixtures/peers):

- topk with ``rescale_acts_by_decoder_norm``: the decoder norms are folded first (latents unchanged),
  since un-whitening changes the decoder row norms that the top-k would otherwise see;
- W_enc <- M @ W_enc; W_dec <- W_dec @ M^-1; b_dec <- b_dec @ M^-1 + mean;
- without ``apply_b_dec_to_input``: b_enc -= mean @ W_enc' (gated: b_gate -= mean @ W_enc',
  b_mag -= (mean @ W_enc') * exp(r_mag)).

A checkpoint that says covariance_whitening but lacks the statistics file is refused with a
FormatError naming that file. Architectures whose encoder is not linear in x (SpaDE, G-SAE) are
refused too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from sae_runtime.errors import FormatError
from sae_runtime.formats.common import check_tensor, fold_latent_scale, read_safetensors
from sae_runtime.saes import SaeConfig

WHITENING_FILE = "activation_whitening.safetensors"
WHITENING_MODE = "covariance_whitening"
_FOLDABLE = ("standard", "jumprelu", "gated", "topk", "batchtopk")


def read_whitening(directory: Path, d_in: int) -> dict[str, Tensor]:
    """mean (d_in,), matrix and inverse_matrix (d_in, d_in) in float64, checked."""
    path = directory / WHITENING_FILE
    if not path.is_file():
        raise FormatError(f"normalize_activations is {WHITENING_MODE!r} but the whitening statistics are missing: "
                          f"a SAELens checkpoint of this kind keeps them in {WHITENING_FILE} (next to "
                          f"activation_scaler.json); copy it along, or use the final SAE, which has them folded in",
                          field=str(path))
    tensors = read_safetensors(path)
    shapes = {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)}
    out = {}
    for key, shape in shapes.items():
        if key not in tensors:
            raise FormatError(f"tensor {key!r} missing (found: {', '.join(sorted(tensors)) or 'none'})", field=str(path))
        t = check_tensor(tensors[key], key, path).double()
        if tuple(t.shape) != shape:
            raise FormatError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape}", field=str(path))
        out[key] = t
    identity = out["matrix"] @ out["inverse_matrix"]
    err = float((identity - torch.eye(d_in, dtype=torch.float64)).abs().max())
    if err > 1e-3:
        raise FormatError(f"'inverse_matrix' is not the inverse of 'matrix' (max |M M^-1 - I| = {err:.3g})",
                          field=str(path))
    return out


def fold_whitening(cfg: SaeConfig, state: dict[str, Tensor], whitening: Mapping[str, Tensor], path: Path) -> SaeConfig:
    """Fold ``whitening`` into ``state`` in place (float64 arithmetic); returns cfg with the
    normalisation and any decoder-norm rescale gone."""
    if cfg.architecture not in _FOLDABLE:
        raise FormatError(f"covariance_whitening cannot be folded into architecture {cfg.architecture!r} "
                          f"(foldable: {', '.join(_FOLDABLE)})", field=str(path))
    dtypes = {k: t.dtype for k, t in state.items()}
    for key in list(state):
        state[key] = state[key].double()
    if cfg.architecture == "topk" and cfg.rescale_acts_by_decoder_norm:
        fold_latent_scale(state, state["W_dec"].norm(dim=-1).clamp(min=1e-8), ("b_enc",))
        cfg = cfg.replace(rescale_acts_by_decoder_norm=False)
    mean, m, m_inv = whitening["mean"], whitening["matrix"], whitening["inverse_matrix"]
    state["W_enc"] = m @ state["W_enc"]
    if not cfg.apply_b_dec_to_input:
        shift = mean @ state["W_enc"]
        if cfg.architecture == "gated":
            state["b_gate"] = state["b_gate"] - shift
            state["b_mag"] = state["b_mag"] - shift * state["r_mag"].exp()
        else:
            state["b_enc"] = state["b_enc"] - shift
    state["W_dec"] = state["W_dec"] @ m_inv
    state["b_dec"] = state["b_dec"] @ m_inv + mean
    for key, dtype in dtypes.items():
        state[key] = state[key].to(dtype)
    return cfg.replace(normalize_activations="none")
