"""OpenAI-style TopK autoencoders (openai/sparse_autoencoder; the SDXL-Turbo SAEs of sdxl-unbox).

``config.json`` = {n_dirs_local, d_model, k, auxk, dead_steps_threshold}; ``state_dict.pth`` =
{"state_dict": {encoder.weight (F, d), decoder.weight (d, F), pre_bias (d,), latent_bias (F,),
stats_last_nonzero (F,)}} (a bare state dict is accepted too); optional ``mean.pt`` / ``std.pt``:
per-latent activation statistics (F,), kept as ``sae.latent_mean`` / ``sae.latent_std``.

Encode: topk(relu(encoder(x - pre_bias) + latent_bias)); decode: decoder(f) + pre_bias. That is our
``topk`` with W_enc = encoder.weight.T, b_enc = latent_bias, W_dec = decoder.weight.T, b_dec = pre_bias.
A directory named like ``unet.up_blocks.0.attentions.0_k10_hidden5120_...`` (sdxl-unbox's layout,
possibly with a ``final`` subdirectory) gives the hook name ``unet.up_blocks.0.attentions.0``.
"""

from __future__ import annotations

import re
from pathlib import Path

from sae_runtime.errors import FormatError
from sae_runtime.formats.common import (
    LoadOptions,
    assemble,
    check_latent_stat,
    dtype_name,
    get_int,
    read_json,
    read_state_dict,
    read_torch,
    take,
)
from sae_runtime.saes import Sae, SaeConfig

CFG_FILE = "config.json"
WEIGHTS_FILE = "state_dict.pth"
STAT_FILES = {"latent_mean": "mean.pt", "latent_std": "std.pt"}
_KNOWN = {"encoder.weight", "decoder.weight", "pre_bias", "latent_bias", "stats_last_nonzero"}
_BLOCK_DIR = re.compile(r"^(unet\.[A-Za-z0-9_.]+?)_k\d+")


def hook_name_from_path(directory: Path) -> str | None:
    for part in (directory.name, directory.parent.name):
        match = _BLOCK_DIR.match(part)
        if match:
            return match.group(1)
    return None


def load(directory: Path, opts: LoadOptions) -> Sae:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    raw = read_json(cfg_path)
    d_sae = get_int(raw, "n_dirs_local", cfg_path)
    d_in = get_int(raw, "d_model", cfg_path)
    tensors = read_state_dict(weights_path, nested_key="state_dict")
    extra = sorted(set(tensors) - _KNOWN)
    if extra:
        raise FormatError(f"unexpected tensor(s) {', '.join(map(repr, extra))}", field=str(weights_path))
    state = {
        "W_enc": take(tensors, "encoder.weight", (d_sae, d_in), weights_path, transposable=True).T.contiguous(),
        "b_enc": take(tensors, "latent_bias", (d_sae,), weights_path),
        "W_dec": take(tensors, "decoder.weight", (d_in, d_sae), weights_path, transposable=True).T.contiguous(),
        "b_dec": take(tensors, "pre_bias", (d_in,), weights_path),
    }
    stats = {}
    for attr, filename in STAT_FILES.items():
        if (directory / filename).is_file():
            stats[attr] = check_latent_stat(read_torch(directory / filename), filename, d_sae, directory / filename)
    file_dtype = tensors["encoder.weight"].dtype
    cfg = SaeConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype_name(file_dtype),
        apply_b_dec_to_input=True,
        k=get_int(raw, "k", cfg_path),
        hook_name=hook_name_from_path(directory),
        metadata={"source_format": "openai_topk",
                  **{key: raw[key] for key in ("auxk", "dead_steps_threshold") if key in raw}},
    )
    return assemble(cfg, state, weights_path, opts, file_dtype=file_dtype, latent_stats=stats)
