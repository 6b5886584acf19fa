"""SAELens directories: ``cfg.json`` + ``sae_weights.safetensors`` (reader and writer).

Both config layouts are read:

- SAELens >= 6.0: ``architecture`` (standard | jumprelu | gated | topk), ``d_in``, ``d_sae``,
  ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``, ``k`` /
  ``rescale_acts_by_decoder_norm`` for topk, and a ``metadata`` dict (``meta`` in some 6.x releases)
  holding ``model_name``, ``hook_name``, ``hook_head_index``, ``prepend_bos``, ...
- before 6.0: the same keys at top level, ``hook_point`` for ``hook_name``, and
  ``activation_fn: topk`` + ``activation_fn_kwargs.k`` for a TopK SAE; a boolean
  ``normalize_activations`` means ``expected_average_only_in``.

``expected_average_only_in`` is folded into the weights as SAELens'
``fold_activation_norm_scaling_factor`` does (W_enc * s, W_dec / s, b_dec / s) when a factor is known:
the ``norm_scaling_factor`` load option, else ``activation_scaler.json``'s ``scaling_factor``, else a
``norm_scaling_factor`` key in cfg.json. A pre-6.0 finetuning ``scaling_factor`` tensor (latents times
s before decode) is folded into W_dec's rows. ``covariance_whitening`` (a mid-training checkpoint with
``activation_whitening.safetensors``) is folded in as SAELens' trainer folds it at the end of training
(:mod:`sae_runtime.formats.whitening`), after any scaling factor; without that file it is refused.
Labels are read from an optional ``labels.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import save_file

from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.formats.common import (
    LoadOptions,
    assemble,
    check_state,
    check_tensor,
    dtype_name,
    fold_norm_scaling_factor,
    get_int,
    parse_dtype,
    read_json,
    read_safetensors,
)
from sae_runtime.formats.whitening import WHITENING_MODE, fold_whitening, read_whitening
from sae_runtime.saes import Sae, SaeConfig
from sae_runtime.saes.base import NORMALIZATIONS

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
SAELENS_VERSION_WRITTEN = "6.0.0"
#: Fields of SAELens' SAEMetadata; the writer keeps only these (SAELens rejects others).
METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_layer", "hook_head_index",
                 "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
                 "context_size", "seqpos_slice", "dataset_path", "sae_lens_version", "sae_lens_training_version")
_PRE_6_RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer", "hook_point_head_index": "hook_head_index"}
#: Architectures SAELens can express; batchtopk is saved as jumprelu with its threshold broadcast.
_WRITABLE = ("standard", "jumprelu", "gated", "topk", "batchtopk")


def read_config(raw: Mapping[str, Any], path: Path) -> SaeConfig:
    """SaeConfig from a SAELens cfg.json dict of either layout."""
    block = raw.get("metadata", raw.get("meta"))
    if isinstance(block, Mapping):
        metadata = dict(block)
    else:  # pre-6.0: metadata keys sit at top level
        renamed = {_PRE_6_RENAMES.get(k, k): v for k, v in raw.items()}
        metadata = {k: renamed[k] for k in METADATA_KEYS if k in renamed}
    architecture = raw.get("architecture") or "standard"
    if not isinstance(architecture, str):
        raise FormatError(f"key 'architecture' must be a string, got {architecture!r}", field=str(path))
    activation_fn = raw.get("activation_fn", raw.get("activation_fn_str"))
    k = raw.get("k")
    if activation_fn == "topk":
        if architecture == "standard":
            architecture = "topk"
        if k is None:
            kwargs = raw.get("activation_fn_kwargs") or {}
            k = kwargs.get("k") if isinstance(kwargs, Mapping) else None
    if architecture == "topk":
        k = get_int({"k": k}, "k", path)
    elif k is not None:
        k = get_int({"k": k}, "k", path)
    normalize = raw.get("normalize_activations", "none")
    if isinstance(normalize, bool):
        normalize = "expected_average_only_in" if normalize else "none"
    normalize = normalize or "none"
    if normalize not in NORMALIZATIONS:
        raise FormatError(f"key 'normalize_activations': unknown value {normalize!r}", field=str(path))
    reshape = raw.get("reshape_activations") or "none"
    if reshape != "none":
        metadata["reshape_activations"] = reshape
    return SaeConfig(
        architecture=architecture,
        d_in=get_int(raw, "d_in", path),
        d_sae=get_int(raw, "d_sae", path),
        dtype=dtype_name(parse_dtype(raw.get("dtype", "float32"), path)),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        k=k,
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        hook_name=metadata.get("hook_name"),
        model_name=metadata.get("model_name"),
        metadata=metadata,
    )


def _positive_factor(value: Any, key: str, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FormatError(f"key {key!r} must be a positive finite number, got {value!r}", field=str(path))
    return float(value)


def find_norm_scaling_factor(directory: Path, raw: Mapping[str, Any], opts: LoadOptions) -> float | None:
    if opts.norm_scaling_factor is not None:  # validated by load_sae
        return opts.norm_scaling_factor
    scaler = directory / SCALER_FILE
    if scaler.is_file():
        factor = _positive_factor(read_json(scaler).get("scaling_factor"), "scaling_factor", scaler)
        if factor is not None:
            return factor
    block = raw.get("metadata", raw.get("meta"))
    for source in (raw, block if isinstance(block, Mapping) else {}):
        if "norm_scaling_factor" in source:
            return _positive_factor(source["norm_scaling_factor"], "norm_scaling_factor", directory / CFG_FILE)
    return None


def load(directory: Path, opts: LoadOptions) -> Sae:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    raw = read_json(cfg_path)
    whitened = raw.get("normalize_activations") == WHITENING_MODE
    cfg = read_config({**raw, "normalize_activations": "none"} if whitened else raw, cfg_path)
    whitening = read_whitening(directory, cfg.d_in) if whitened else None
    tensors = dict(read_safetensors(weights_path))
    file_dtype = next((t.dtype for k, t in tensors.items() if k == "W_dec"), None)

    finetuning_scale = tensors.pop("scaling_factor", None)
    state = check_state(cfg, tensors, weights_path)
    if finetuning_scale is not None:
        scale = check_tensor(finetuning_scale, "scaling_factor", weights_path)
        if scale.shape != (cfg.d_sae,):
            raise FormatError(f"tensor 'scaling_factor' has shape {tuple(scale.shape)}, expected ({cfg.d_sae},)",
                              field=str(weights_path))
        state["W_dec"] = state["W_dec"] * scale[:, None]

    if whitening is not None:  # the SAE reads (x * factor - mean) @ M: the whitening is the inner fold
        cfg = fold_whitening(cfg, state, whitening, weights_path)
        cfg = cfg.replace(metadata={**cfg.metadata, "normalize_activations_folded": WHITENING_MODE})
    factor = find_norm_scaling_factor(directory, raw, opts)
    if factor is not None:
        fold_norm_scaling_factor(state, factor)
        cfg = cfg.replace(normalize_activations="none", metadata={**cfg.metadata, "norm_scaling_factor": factor})
    elif cfg.normalize_activations == "expected_average_only_in":
        warnings.warn(f"{cfg_path}: normalize_activations is expected_average_only_in but no norm scaling factor "
                      f"was found ({SCALER_FILE}, cfg key or load option); loading the weights unfolded", stacklevel=2)
    return assemble(cfg, state, weights_path, opts, file_dtype=None if "dtype" in raw else file_dtype)


# -- writer ------------------------------------------------------------------------------------
def saelens_config(cfg: SaeConfig) -> dict[str, Any]:
    """cfg.json (6.x layout) for ``cfg``; batchtopk is written as jumprelu."""
    if cfg.architecture not in _WRITABLE:
        raise InvalidArgument(f"SAELens has no architecture for {cfg.architecture!r} "
                              f"(writable: {', '.join(_WRITABLE)}); use the native format", field="architecture")
    metadata = {k: v for k, v in cfg.metadata.items() if k in METADATA_KEYS}
    metadata.update(model_name=cfg.model_name, hook_name=cfg.hook_name, sae_lens_version=SAELENS_VERSION_WRITTEN)
    out: dict[str, Any] = {
        "architecture": "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.metadata.get("reshape_activations", "none"),
        "metadata": metadata,
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    return out


def save(sae: Sae, directory: str | Path) -> Path:
    """Write ``sae`` as a SAELens directory (cfg.json, sae_weights.safetensors, labels.json if labelled)."""
    directory = Path(directory)
    config = saelens_config(sae.cfg)
    state = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()
             if k not in ("latent_mean", "latent_std")}
    if sae.cfg.architecture == "batchtopk":
        state["threshold"] = state["threshold"].expand(sae.d_sae).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CFG_FILE).write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    if sae.labels:
        (directory / "labels.json").write_text(json.dumps(sae.labels, indent=2), encoding="utf-8")
    return directory


__all__ = ["load", "save", "read_config", "CFG_FILE", "WEIGHTS_FILE"]
