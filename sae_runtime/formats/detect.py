"""Recognise an SAE directory's format from its files, and load it.

| format | files |
|---|---|
| native | sae.json + sae.safetensors |
| saelens | cfg.json + sae_weights.safetensors |
| sparsify | cfg.json + sae.safetensors (or a parent directory of such hookpoint directories) |
| dictionary_learning | ae.pt + config.json |
| openai_topk | config.json + state_dict.pth (+ mean.pt, std.pt) |

When the weights file is missing, the config file's keys still decide the format, so the error names
the missing file of the right format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.formats import dictionary_learning, native, openai_topk, saelens, sparsify
from sae_runtime.formats.common import LoadOptions, check_labels, parse_dtype, read_json
from sae_runtime.saes import Sae

LOADERS: dict[str, Callable[[Path, LoadOptions], Sae]] = {
    "native": native.load,
    "saelens": saelens.load,
    "sparsify": sparsify.load,
    "dictionary_learning": dictionary_learning.load,
    "openai_topk": openai_topk.load,
}
LABELS_FILE = "labels.json"


def _json_keys(path: Path) -> set[str]:
    """Top-level keys of a JSON object file, or an empty set when unreadable (detection only)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _directory(path: str | Path, hookpoint: str | None) -> Path:
    p = Path(path)
    if p.is_file():  # a file inside the SAE directory was named
        p = p.parent
    if not p.is_dir():
        raise FormatError("no such directory", field=str(p))
    if hookpoint is not None:
        sub = p / hookpoint
        if not sub.is_dir():
            available = sparsify.hookpoints(p)
            raise FormatError(f"hookpoint {hookpoint!r} not found (available: {', '.join(available) or 'none'})",
                              field=str(sub))
        p = sub
    return p


def _detect(p: Path) -> str:
    has = {name for name in ("sae.json", "sae.safetensors", "cfg.json", "sae_weights.safetensors", "ae.pt",
                             "config.json", "state_dict.pth") if (p / name).is_file()}
    if "sae.json" in has:
        return "native"
    if "cfg.json" in has:
        if "sae_weights.safetensors" in has:
            return "saelens"
        if "sae.safetensors" in has:
            return "sparsify"
        keys = _json_keys(p / "cfg.json")
        return "sparsify" if keys & {"num_latents", "expansion_factor"} and "d_sae" not in keys else "saelens"
    if "ae.pt" in has:
        return "dictionary_learning"
    if "config.json" in has:
        if "state_dict.pth" in has:
            return "openai_topk"
        keys = _json_keys(p / "config.json")
        if "trainer" in keys:
            return "dictionary_learning"
        if "n_dirs_local" in keys:
            return "openai_topk"
    hookpoints = sparsify.hookpoints(p)
    if hookpoints:
        raise FormatError(f"a sparsify checkpoint with several hookpoints: pass hookpoint= one of "
                          f"{', '.join(hookpoints)}", field=str(p))
    raise FormatError("no SAE files recognised (expected sae.json, cfg.json + sae_weights.safetensors, "
                      "cfg.json + sae.safetensors, ae.pt + config.json, or config.json + state_dict.pth)",
                      field=str(p))


def detect_format(path: str | Path, *, hookpoint: str | None = None) -> str:
    """The format name (a key of LOADERS) of the SAE directory at ``path`` (optionally ``path/hookpoint``)."""
    return _detect(_directory(path, hookpoint))


def _dtype_option(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    try:
        return parse_dtype(dtype, "dtype")
    except FormatError as exc:
        raise InvalidArgument(exc.message, field="dtype") from None


def _factor_option(factor: float | None) -> float | None:
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise InvalidArgument(f"must be a positive finite number, got {factor!r}", field="norm_scaling_factor")
    return float(factor)


def load_sae(path: str | Path, *, format: str | None = None, hookpoint: str | None = None,
             dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
             norm_scaling_factor: float | None = None) -> Sae:
    """Load the SAE in the directory ``path`` (or ``path/hookpoint``), in eval mode.

    ``format`` skips detection; ``dtype``/``device`` choose the parameters' dtype and device
    (default: the file's dtype, CPU); ``norm_scaling_factor`` folds SAELens
    ``expected_average_only_in`` normalisation into the weights. A ``labels.json``
    ({label: latent index}) next to the weights adds labels. Raises FormatError (field = the file)
    for missing, corrupt or inconsistent files, NotFound for an unknown architecture.
    """
    directory = _directory(path, hookpoint)
    name = format or _detect(directory)
    if name not in LOADERS:
        raise FormatError(f"unknown format {name!r} (known: {', '.join(LOADERS)})", field=str(directory))
    opts = LoadOptions(dtype=_dtype_option(dtype), device=device,
                       norm_scaling_factor=_factor_option(norm_scaling_factor))
    sae = LOADERS[name](directory, opts)
    labels_path = directory / LABELS_FILE
    if labels_path.is_file():
        sae.labels.update(check_labels(read_json(labels_path), sae.d_sae, labels_path))
    return sae
