"""Loading the SAEs a ModelSpec names, shared by the backends' ``from_spec``."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sae_runtime.backends.spec import ModelSpec
from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.saes.base import Sae

if TYPE_CHECKING:
    from torch import nn

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(/[\w.\-/]+)?$")


def resolve_sae_location(location: str) -> str:
    """A local directory for an SAE named by a local path or by ``owner/repo[/folder/...]`` on the hub.

    Hub ids go through huggingface_hub's cache (``snapshot_download`` of that folder only; with
    ``HF_HUB_OFFLINE=1`` the cache alone), the way ``from_pretrained`` finds base models. Raises
    NotFound naming the location when it is neither a directory nor a fetchable hub folder.
    """
    if Path(location).exists() or os.path.isabs(location) or not _HUB_ID.match(location):
        return location
    owner, repo, *folder = location.split("/")
    sub = "/".join(folder)
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(f"{owner}/{repo}", allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as err:  # offline, unknown repo, no access: one clear error naming the id
        raise NotFound(f"cannot fetch SAE {location!r} from the hub: {err}", field="saes.path") from None
    return str(Path(root) / sub)


def load_ffkv(model: "nn.Module | None", name: str, layer: int, k: int | None, labels_dir: str = "") -> Sae:
    """The FF-KV dictionary of ``model``'s layer ``layer`` MLP, with the labels of
    ``labels_dir/labels.json`` when given. InvalidArgument naming the entry without a model."""
    from sae_runtime.formats.common import check_labels
    from sae_runtime.saes.ffkv import ffkv_from_model

    if model is None:
        raise InvalidArgument(f"SAE {name!r} is an FF-KV dictionary: it is built from the loaded model", field=f"saes.{name}.ffkv")
    sae = ffkv_from_model(model, layer, k)
    path = Path(labels_dir) / "labels.json" if labels_dir else None
    if path is not None and path.is_file():
        sae.labels.update(check_labels(json.loads(path.read_text()).get("labels") or {}, sae.d_sae, path))
    return sae


def load_spec_saes(spec: ModelSpec, model: "nn.Module | None" = None) -> tuple[dict[str, Sae], dict[str, float]]:
    """The SAEs of ``spec`` (name -> Sae on ``spec.device``, ``hook_name`` overrides applied) and
    how long each took to load, in seconds (reported by the service as a metric). FF-KV entries
    (``ffkv_layer`` set) are built from ``model``'s weights, so they need it."""
    from sae_runtime.formats import load_sae

    saes: dict[str, Sae] = {}
    seconds: dict[str, float] = {}
    from sae_runtime.formats import neuronpedia, saelens_registry

    for s in spec.saes:
        started = time.perf_counter()
        if s.ffkv_layer is not None:
            saes[s.name] = load_ffkv(model, s.name, s.ffkv_layer, s.ffkv_k, s.path)
            seconds[s.name] = time.perf_counter() - started
            continue
        location = saelens_registry.resolve(*s.saelens) if s.saelens else resolve_sae_location(s.path)
        sae = load_sae(location, format=s.format, device=None if s.stitch else spec.device)
        if s.stitch:
            from sae_runtime.stitch import Stitch, transfer_sae

            sae = transfer_sae(sae, Stitch.load(s.stitch)).to(spec.device)
        if s.hook_name:
            sae.cfg = sae.cfg.replace(hook_name=s.hook_name)
        if s.labels:
            np_id = s.neuronpedia_id or sae.cfg.metadata.get("neuronpedia_id")
            sae.labels.update(neuronpedia.load_labels(s.labels, sae.d_sae, neuronpedia_id=np_id))
        saes[s.name] = sae
        seconds[s.name] = time.perf_counter() - started
    return saes, seconds
