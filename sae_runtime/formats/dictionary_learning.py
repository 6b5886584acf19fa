"""saprmarks/dictionary_learning: ``ae.pt`` (a torch state dict) + ``config.json``.

``config.json["trainer"]`` gives ``dict_class``, ``activation_dim`` (d_in), ``dict_size`` (d_sae),
``k``, ``layer``, ``lm_name`` and ``submodule_name``. The state dict keys per class (nn.Linear
weights are (out, in), so ``encoder.weight`` is (d_sae, d_in) and ``decoder.weight`` (d_in, d_sae)):

| dict_class | tensors | our architecture |
|---|---|---|
| AutoEncoder | bias, encoder.weight, encoder.bias, decoder.weight | standard, b_dec = bias |
| GatedAutoEncoder | decoder_bias, encoder.weight, r_mag, gate_bias, mag_bias, decoder.weight | gated |
| JumpReluAutoEncoder | W_enc, b_enc, W_dec, b_dec, threshold | jumprelu, apply_b_dec_to_input False |
| AutoEncoderTopK | encoder.*, decoder.weight, b_dec, buffers k, threshold | topk |
| BatchTopKSAE | encoder.*, decoder.weight, b_dec, buffers k, threshold | batchtopk (scalar threshold) |
| MatryoshkaBatchTopKSAE | W_enc, b_enc, W_dec, b_dec, buffers k, threshold, group_sizes | batchtopk |

Latent scale: the loader gives what ``dictionary_learning.utils.load_dictionary`` gives (its
behaviour since January 2025, checked against the library's own outputs in tests/fixtures/peers):

- AutoEncoder is loaded with ``normalize_decoder=True``: decoder columns are divided by their norms
  and the encoder rows and bias multiplied by them, so latents are on the unit-decoder scale
  (StandardTrainerAprilUpdate checkpoints have non-unit decoders). The same fold is applied here.
- GatedAutoEncoder scales by the decoder norm only when called with ``normalize_decoder=True``
  (default False, and load_dictionary does not ask for it): no scaling here.
- JumpReluAutoEncoder applies no norm scaling: none here.
- BatchTopK classes encode at inference with their global threshold (``use_threshold=True``);
  AutoEncoderTopK with its top-k; neither rescales.

A residual dictionary for layer i reads the OUTPUT of layer i.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from sae_runtime.errors import FormatError
from sae_runtime.formats.common import (
    LoadOptions,
    assemble,
    check_tensor,
    dtype_name,
    fold_latent_scale,
    get_int,
    read_json,
    read_state_dict,
    take,
)
from sae_runtime.saes import Sae, SaeConfig

CFG_FILE = "config.json"
WEIGHTS_FILE = "ae.pt"
SUPPORTED = ("AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE",
             "MatryoshkaBatchTopKSAE")


def _int_buffer(tensors: Mapping[str, Tensor], key: str, path: Path) -> int:
    if key not in tensors:
        raise FormatError(f"buffer {key!r} missing", field=str(path))
    t = check_tensor(tensors[key], key, path, floating=False)
    if t.numel() != 1 or t.is_floating_point() or t.is_complex() or int(t) < 1:
        raise FormatError(f"buffer {key!r} must be one positive integer, got {t.tolist()!r}", field=str(path))
    return int(t)


def _linear_pair(tensors: Mapping[str, Tensor], d_in: int, d_sae: int, path: Path) -> dict[str, Tensor]:
    """W_enc, W_dec from nn.Linear encoder/decoder weights."""
    return {
        "W_enc": take(tensors, "encoder.weight", (d_sae, d_in), path, transposable=True).T.contiguous(),
        "W_dec": take(tensors, "decoder.weight", (d_in, d_sae), path, transposable=True).T.contiguous(),
    }


def _map_state(dict_class: str, t: Mapping[str, Tensor], d_in: int, d_sae: int, path: Path) -> tuple[str, dict]:
    """(architecture, our state dict) for a dictionary_learning state dict."""
    if dict_class == "AutoEncoder":
        state = _linear_pair(t, d_in, d_sae, path)
        state.update(b_enc=take(t, "encoder.bias", (d_sae,), path), b_dec=take(t, "bias", (d_in,), path))
        # AutoEncoder.from_pretrained(normalize_decoder=True): latents on the unit-decoder scale.
        fold_latent_scale(state, state["W_dec"].norm(dim=-1), ("b_enc",))
        return "standard", state
    if dict_class == "GatedAutoEncoder":
        state = _linear_pair(t, d_in, d_sae, path)
        state.update(b_dec=take(t, "decoder_bias", (d_in,), path), r_mag=take(t, "r_mag", (d_sae,), path),
                     b_gate=take(t, "gate_bias", (d_sae,), path), b_mag=take(t, "mag_bias", (d_sae,), path))
        return "gated", state
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = _linear_pair(t, d_in, d_sae, path)
        state.update(b_enc=take(t, "encoder.bias", (d_sae,), path), b_dec=take(t, "b_dec", (d_in,), path))
    else:  # JumpReluAutoEncoder, MatryoshkaBatchTopKSAE: plain parameters, W_enc (d_in, d_sae)
        state = {
            "W_enc": take(t, "W_enc", (d_in, d_sae), path, transposable=True),
            "b_enc": take(t, "b_enc", (d_sae,), path),
            "W_dec": take(t, "W_dec", (d_sae, d_in), path, transposable=True),
            "b_dec": take(t, "b_dec", (d_in,), path),
        }
    if dict_class == "JumpReluAutoEncoder":
        state["threshold"] = take(t, "threshold", (d_sae,), path)
        return "jumprelu", state
    if dict_class == "AutoEncoderTopK":
        return "topk", state
    state["threshold"] = take(t, "threshold", (), path)
    return "batchtopk", state


def load(directory: Path, opts: LoadOptions) -> Sae:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    raw = read_json(cfg_path)
    trainer: Any = raw.get("trainer")
    if not isinstance(trainer, Mapping):
        raise FormatError("key 'trainer' missing or not an object", field=str(cfg_path))
    dict_class = trainer.get("dict_class")
    if dict_class not in SUPPORTED:
        raise FormatError(f"key 'trainer.dict_class': {dict_class!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED)})", field=str(cfg_path))
    tensors = read_state_dict(weights_path)
    d_in = get_int(trainer, "activation_dim", cfg_path)
    d_sae = get_int(trainer, "dict_size", cfg_path)

    file_dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), None)
    architecture, state = _map_state(dict_class, tensors, d_in, d_sae, weights_path)
    k = None
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        k = _int_buffer(tensors, "k", weights_path) if "k" in tensors else get_int(trainer, "k", cfg_path)
    metadata: dict[str, Any] = {"source_format": "dictionary_learning", "dict_class": dict_class}
    for key in ("layer", "lm_name", "submodule_name", "trainer_class"):
        if trainer.get(key) is not None:
            metadata[key] = trainer[key]
    if dict_class == "MatryoshkaBatchTopKSAE" and "group_sizes" in tensors:
        metadata["group_sizes"] = [int(s) for s in check_tensor(tensors["group_sizes"], "group_sizes", weights_path,
                                                                  floating=False).tolist()]
    cfg = SaeConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype_name(file_dtype) if file_dtype is not None else "float32",
        apply_b_dec_to_input=dict_class != "JumpReluAutoEncoder" or bool(trainer.get("apply_b_dec_to_input", False)),
        k=k,
        hook_name=trainer.get("submodule_name"),
        model_name=trainer.get("lm_name"),
        metadata=metadata,
    )
    return assemble(cfg, state, weights_path, opts, file_dtype=file_dtype)
