"""Shared pieces of the loaders: safe file readers, tensor checks, and building the Sae.

Every error is a :class:`FormatError` whose ``field`` is the file path and whose message names the
key or tensor at fault. ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor

from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.saes import Sae, SaeConfig, build_sae

_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
                  "fp64": "float64", "double": "float64"}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: Encoder/decoder weights: a tensor stored as the exact transpose of the expected (d_in, d_sae) or
#: (d_sae, d_in) is transposed with a warning (unambiguous only when d_in != d_sae).
TRANSPOSABLE = ("W_enc", "W_dec")


@dataclass(frozen=True)
class LoadOptions:
    """Options every loader honours. ``dtype``/``device`` of the returned Sae (None: from the file)."""

    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    #: SAELens ``expected_average_only_in``: fold this factor in, overriding any found on disk.
    norm_scaling_factor: float | None = None


# -- dtypes ------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: Any, path: Path | str, key: str = "dtype") -> torch.dtype:
    """A floating torch dtype from a config string like "float32", "torch.bfloat16" or "bf16"."""
    if isinstance(value, torch.dtype):
        name = dtype_name(value)
    elif isinstance(value, str):
        name = value.strip().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
    else:
        name = None
    if name not in FLOAT_DTYPES:
        raise FormatError(f"key {key!r}: unsupported dtype {value!r} (want one of {', '.join(FLOAT_DTYPES)})",
                          field=str(path))
    return getattr(torch, name)


# -- file readers ------------------------------------------------------------------------------
def require_file(path: Path) -> Path:
    if not path.is_file():
        raise FormatError("missing file", field=str(path))
    return path


def read_json(path: Path) -> dict[str, Any]:
    require_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"invalid JSON: {exc}", field=str(path)) from None
    if not isinstance(data, dict):
        raise FormatError(f"expected a JSON object, got {type(data).__name__}", field=str(path))
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    require_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError/ValueError
        raise FormatError(f"corrupt or unreadable safetensors file: {exc}", field=str(path)) from None


def read_torch(path: Path) -> Any:
    """torch.load with weights_only=True: a pickle that needs arbitrary globals is refused, never run."""
    require_file(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for refused globals, RuntimeError/EOFError for corrupt files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"cannot be read with torch.load(weights_only=True): {first_line}", field=str(path)) from None


def read_state_dict(path: Path, *, nested_key: str | None = None) -> dict[str, Tensor]:
    """A ``{name: tensor}`` dict from a .pt/.pth file, optionally under ``nested_key``; strips torch.compile's prefix."""
    obj = read_torch(path)
    if nested_key is not None and isinstance(obj, Mapping) and nested_key in obj:
        obj = obj[nested_key]
    if not isinstance(obj, Mapping):
        raise FormatError(f"expected a state dict (mapping of tensors), got {type(obj).__name__}", field=str(path))
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise FormatError(f"entry {key!r} is {type(value).__name__}, not a tensor", field=str(path))
        state[str(key).removeprefix("_orig_mod.")] = value
    return state


# -- config values -----------------------------------------------------------------------------
_MISSING = object()


def get_int(cfg: Mapping[str, Any], key: str, path: Path, default: Any = _MISSING, *, minimum: int = 1) -> Any:
    value = cfg.get(key, default)
    if value is _MISSING:
        raise FormatError(f"key {key!r} missing", field=str(path))
    if value is None and default is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FormatError(f"key {key!r} must be an integer >= {minimum}, got {value!r}", field=str(path))
    return value


# -- tensors -----------------------------------------------------------------------------------
def check_tensor(t: Any, key: str, path: Path, *, floating: bool = True) -> Tensor:
    """t as a tensor, promoted to at least float32 when floating; FormatError for NaN/inf or a wrong dtype."""
    if not isinstance(t, Tensor):
        raise FormatError(f"tensor {key!r} is {type(t).__name__}, not a tensor", field=str(path))
    if floating:
        if not t.is_floating_point():
            raise FormatError(f"tensor {key!r} has dtype {dtype_name(t.dtype)}, expected a floating dtype",
                              field=str(path))
        if not bool(torch.isfinite(t).all()):
            raise FormatError(f"tensor {key!r} contains NaN or inf", field=str(path))
        t = t.to(torch.promote_types(t.dtype, torch.float32))
    return t


def take(tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...], path: Path, *,
         transposable: bool = False) -> Tensor:
    """tensors[key], checked for presence, dtype, finiteness and ``shape``.

    With ``transposable``, a 2-d tensor stored as the exact transpose of ``shape`` (and not square)
    is transposed with a warning; any other shape is a FormatError naming the key.
    """
    if key not in tensors:
        raise FormatError(f"tensor {key!r} missing (found: {', '.join(sorted(tensors)) or 'none'})", field=str(path))
    t = check_tensor(tensors[key], key, path)
    want = tuple(shape)
    got = tuple(t.shape)
    if got == want:
        return t
    if transposable and len(want) == 2 and want[0] != want[1] and got == want[::-1]:
        warnings.warn(f"{path}: tensor {key!r} stored as {got}, transposed to the expected {want}", stacklevel=3)
        return t.T.contiguous()
    raise FormatError(f"tensor {key!r} has shape {got}, expected {want}", field=str(path))


def expected_shapes(cfg: SaeConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the Sae that ``cfg`` builds (built on the meta device: no memory)."""
    with torch.device("meta"):
        template = build_sae(cfg)
    return {name: tuple(t.shape) for name, t in template.state_dict().items()}


def check_state(cfg: SaeConfig, tensors: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The tensors ``cfg``'s architecture needs, checked; FormatError naming missing or unexpected ones."""
    try:
        shapes = expected_shapes(cfg)
    except InvalidArgument as exc:
        raise FormatError(f"config key {exc.field!r}: {exc.message}", field=str(path)) from None
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise FormatError(f"unexpected tensor(s) {', '.join(map(repr, unexpected))} for architecture "
                          f"{cfg.architecture!r} (expected {', '.join(sorted(shapes))})", field=str(path))
    return {key: take(tensors, key, shape, path, transposable=key in TRANSPOSABLE) for key, shape in shapes.items()}


def check_labels(raw: Any, d_sae: int, path: Path) -> dict[str, int]:
    """Labels ``{label: latent index}`` with every index in [0, d_sae)."""
    if not isinstance(raw, Mapping):
        raise FormatError(f"labels must be an object {{label: latent index}}, got {type(raw).__name__}",
                          field=str(path))
    labels = {}
    for label, index in raw.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < d_sae:
            raise FormatError(f"label {label!r}: latent index {index!r} out of range [0, {d_sae})", field=str(path))
        labels[str(label)] = index
    return labels


def check_latent_stat(t: Any, key: str, d_sae: int, path: Path) -> Tensor:
    """A per-latent statistic: any shape with d_sae elements, returned as (d_sae,)."""
    t = check_tensor(t, key, path)
    if t.numel() != d_sae:
        raise FormatError(f"tensor {key!r} has shape {tuple(t.shape)}, expected ({d_sae},)", field=str(path))
    return t.reshape(d_sae)


# -- folds (exact reparametrisations) ------------------------------------------------------------
def fold_norm_scaling_factor(state: dict[str, Tensor], factor: float) -> None:
    """SAELens ``fold_activation_norm_scaling_factor``: the SAE was trained on x * factor.

    W_enc *= factor, W_dec /= factor, b_dec /= factor, so the SAE now reads and writes raw x.
    """
    state["W_enc"] = state["W_enc"] * factor
    state["W_dec"] = state["W_dec"] / factor
    state["b_dec"] = state["b_dec"] / factor


def fold_latent_scale(state: dict[str, Tensor], scale: Tensor, scaled: tuple[str, ...]) -> None:
    """Absorb "latents are multiplied by ``scale`` (d_sae,) after encode and divided by it before decode".

    Exact for positively homogeneous encoders (relu, jumprelu, gated): W_enc columns and the given
    per-latent tensors are multiplied by scale, W_dec rows divided by it. A zero scale (a dead latent,
    always 0) leaves its decoder row as it was.
    """
    state["W_enc"] = state["W_enc"] * scale
    for key in scaled:
        state[key] = state[key] * scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    state["W_dec"] = state["W_dec"] / safe[:, None]


# -- building ----------------------------------------------------------------------------------
def assemble(cfg: SaeConfig, state: Mapping[str, Tensor], path: Path, opts: LoadOptions, *,
             file_dtype: torch.dtype | None = None, labels: Mapping[str, int] | None = None,
             latent_stats: Mapping[str, Tensor] | None = None) -> Sae:
    """Build the Sae for ``cfg`` and load ``state`` into it, in opts.dtype (else ``file_dtype``, else cfg.dtype)."""
    dtype = opts.dtype or file_dtype or parse_dtype(cfg.dtype, path)
    cfg = cfg.replace(dtype=dtype_name(dtype))
    checked = check_state(cfg, state, path)
    sae = build_sae(cfg)
    sae.load_state_dict({key: t.to(dtype) for key, t in checked.items()}, strict=True)
    for key, t in (latent_stats or {}).items():
        setattr(sae, key, t.to(dtype))
    sae.labels = dict(labels or {})
    if opts.device is not None:
        sae.to(opts.device)
    return sae.eval()


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(SaeConfig)}
