"""The native SAE format of sae_runtime (reader and writer).

A native SAE is a directory with two files:

``sae.json``
    A JSON object::

        {
          "format": "sae_runtime.native",
          "format_version": 1,
          "architecture": "jumprelu",          # a registered architecture: standard, jumprelu,
                                               #   batchtopk, gated, topk, topk-sigmoid, spade
          "d_in": 256, "d_sae": 4096,          # input width, number of latents
          "dtype": "float32",                  # float16 | bfloat16 | float32 | float64
          "apply_b_dec_to_input": true,        # encode reads x - b_dec
          "normalize_activations": "none",     # none | constant_norm_rescale | layer_norm
          "k": null,                           # latents kept per position (topk, topk-sigmoid)
          "rescale_acts_by_decoder_norm": false,
          "n_concepts": 0,                     # topk-sigmoid: the first n latents are labelled concepts
          "hook_name": "blocks.3.hook_resid_post",
          "model_name": "tiny-llama",
          "metadata": {},                      # free-form, kept on round trips
          "labels": {"golden_gate": 17}        # concept label -> latent index
        }

    Every key of ``SaeConfig`` may appear; ``architecture``, ``d_in`` and ``d_sae`` are required,
    the others default as in ``SaeConfig``. Unknown keys are ignored; a ``format_version`` newer than
    this reader's is refused.

``sae.safetensors``
    The state dict with SAELens tensor names and row-vector orientation: ``W_enc`` (d_in, d_sae),
    ``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in), plus per architecture
    ``threshold`` (jumprelu: (d_sae,), batchtopk: scalar), ``b_gate``/``b_mag``/``r_mag`` instead of
    ``b_enc`` (gated), ``lambda_raw`` scalar instead of ``b_enc`` (spade). Optional ``latent_mean``
    and ``latent_std`` (d_sae,) hold per-latent activation statistics.

Encode formulas are those of reference.md section 1; decode is always ``f @ W_dec + b_dec``
(topk with ``rescale_acts_by_decoder_norm`` divides f by ||W_dec[i]|| first).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import save_file

from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.formats.common import (
    LoadOptions,
    assemble,
    check_labels,
    check_latent_stat,
    dtype_name,
    get_int,
    parse_dtype,
    read_json,
    read_safetensors,
)
from sae_runtime.saes import Sae, SaeConfig
from sae_runtime.saes.base import NORMALIZATIONS

CFG_FILE = "sae.json"
WEIGHTS_FILE = "sae.safetensors"
FORMAT_NAME = "sae_runtime.native"
FORMAT_VERSION = 1
LATENT_STATS = ("latent_mean", "latent_std")


def _typed(raw: Mapping[str, Any], key: str, types: tuple[type, ...], default: Any, path: Path) -> Any:
    value = raw.get(key, default)
    if value is not None and not isinstance(value, types):
        raise FormatError(f"key {key!r} has type {type(value).__name__}, expected {types[0].__name__}", field=str(path))
    return value


def read_config(raw: Mapping[str, Any], path: Path) -> SaeConfig:
    version = raw.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise FormatError(f"key 'format_version': unsupported version {version!r} (this reader: {FORMAT_VERSION})",
                          field=str(path))
    architecture = _typed(raw, "architecture", (str,), None, path)
    if architecture is None:
        raise FormatError("key 'architecture' missing", field=str(path))
    normalize = _typed(raw, "normalize_activations", (str,), "none", path)
    if normalize not in NORMALIZATIONS:
        raise FormatError(f"key 'normalize_activations': unknown value {normalize!r}", field=str(path))
    metadata = _typed(raw, "metadata", (dict,), {}, path) or {}
    return SaeConfig(
        architecture=architecture,
        d_in=get_int(raw, "d_in", path),
        d_sae=get_int(raw, "d_sae", path),
        dtype=dtype_name(parse_dtype(raw.get("dtype", "float32"), path)),
        apply_b_dec_to_input=bool(_typed(raw, "apply_b_dec_to_input", (bool,), True, path)),
        normalize_activations=normalize,
        k=get_int(raw, "k", path, None),
        rescale_acts_by_decoder_norm=bool(_typed(raw, "rescale_acts_by_decoder_norm", (bool,), False, path)),
        n_concepts=get_int(raw, "n_concepts", path, 0, minimum=0),
        hook_name=_typed(raw, "hook_name", (str,), None, path),
        model_name=_typed(raw, "model_name", (str,), None, path),
        metadata=metadata,
    )


def load(directory: Path, opts: LoadOptions) -> Sae:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    raw = read_json(cfg_path)
    cfg = read_config(raw, cfg_path)
    labels = check_labels(raw.get("labels") or {}, cfg.d_sae, cfg_path)
    tensors = dict(read_safetensors(weights_path))
    stats = {key: check_latent_stat(tensors.pop(key), key, cfg.d_sae, weights_path)
             for key in LATENT_STATS if key in tensors}
    return assemble(cfg, tensors, weights_path, opts, labels=labels, latent_stats=stats)


def native_config(sae: Sae) -> dict[str, Any]:
    fields = dataclasses.asdict(sae.cfg)
    fields["dtype"] = dtype_name(sae.W_dec.dtype)
    out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **fields, "labels": dict(sae.labels)}
    try:
        json.dumps(out)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"config is not JSON-serialisable: {exc}", field="metadata") from None
    return out


def save(sae: Sae, directory: str | Path) -> Path:
    """Write ``sae`` (config, labels, tensors incl. latent statistics) as a native directory."""
    directory = Path(directory)
    config = native_config(sae)
    state = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CFG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
