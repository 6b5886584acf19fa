"""SAEs named the SAELens way: a pretrained ``release`` and an ``sae_id`` in it.

``{release: gemma-scope-2b-pt-res-canonical, sae_id: layer_20/width_16k/canonical}`` is looked up
in SAELens' own pretrained registry (``pretrained_saes.yaml``) and loaded with SAELens' own
converter for that release (``SAE.from_pretrained``), which fetches the files through
huggingface_hub's cache (``HF_HUB_OFFLINE=1``: the cache alone). The SAE is then written once in
SAELens' directory format under the local cache (``$SAE_STEERING_CACHE``, default
``~/.cache/sae-steering``) and read from there by :func:`sae_runtime.formats.load_sae`, so every
release format SAELens converts (Gemma Scope ``params.npz``, sparsify, dictionary_learning, ...)
comes out the same way.

SAELens is an optional extra (``pip install 'sae-steering[saelens]'``), not a dependency of the
default install; without it, naming a release is an InvalidArgument naming the extra.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any

from sae_runtime.errors import InvalidArgument, NotFound

EXTRA = "pip install 'sae-steering[saelens]'"
FIELD = "saes.saelens"


def available() -> bool:
    return importlib.util.find_spec("sae_lens") is not None


def require() -> None:
    """InvalidArgument naming the optional extra when sae-lens is not installed."""
    if not available():
        raise InvalidArgument(f"SAELens release names need the optional extra sae-lens: {EXTRA} "
                              f"(or give the SAE's local path or hub id instead)", field=FIELD)


def cache_root() -> Path:
    return Path(os.environ.get("SAE_STEERING_CACHE", Path.home() / ".cache" / "sae-steering")) / "saelens"


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", part)


def lookup(release: str, sae_id: str) -> Any:
    """SAELens' registry entry for ``release``; NotFound naming the unknown release or sae_id."""
    require()
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    registry = get_pretrained_saes_directory()
    if release not in registry:
        near = sorted(r for r in registry if release.split("-")[0] in r)[:8]
        raise NotFound(f"unknown SAELens release {release!r}" + (f" (similar: {', '.join(near)})" if near else ""),
                       field=f"{FIELD}.release")
    entry = registry[release]
    if sae_id not in entry.saes_map:
        ids = sorted(entry.saes_map)
        raise NotFound(f"release {release!r} has no sae_id {sae_id!r} ({len(ids)} ids, e.g. {', '.join(ids[:5])})",
                       field=f"{FIELD}.sae_id")
    return entry


def resolve(release: str, sae_id: str) -> Path:
    """A local SAELens-format directory holding ``release``/``sae_id`` (fetched and converted once)."""
    entry = lookup(release, sae_id)
    directory = cache_root() / _safe(release) / _safe(sae_id)
    if (directory / "cfg.json").is_file() and (directory / "sae_weights.safetensors").is_file():
        return directory
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as err:  # offline, no access, a converter error: one clear error naming the SAE
        raise NotFound(f"cannot fetch SAELens SAE {release}/{sae_id} (hub repo {entry.repo_id}): {err}",
                       field=FIELD) from None
    if isinstance(sae, tuple):  # SAELens < 6 returned (sae, cfg, sparsity)
        sae = sae[0]
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    sae.save_model(partial)
    partial.replace(directory)
    return directory


def neuronpedia_id(release: str, sae_id: str) -> str | None:
    """Neuronpedia's ``<modelId>/<layer>`` for the SAE, from SAELens' registry."""
    ids = getattr(lookup(release, sae_id), "neuronpedia_id", None) or {}
    return ids.get(sae_id)
