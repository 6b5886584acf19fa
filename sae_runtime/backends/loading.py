"""Loading the SAEs a ModelSpec names, shared by the backends' ``from_spec``."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from sae_runtime.backends.spec import ModelSpec
from sae_runtime.errors import NotFound
from sae_runtime.saes.base import Sae

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


def load_spec_saes(spec: ModelSpec) -> tuple[dict[str, Sae], dict[str, float]]:
    """The SAEs of ``spec`` (name -> Sae on ``spec.device``, ``hook_name`` overrides applied) and
    how long each took to load, in seconds (reported by the service as a metric)."""
    from sae_runtime.formats import load_sae

    saes: dict[str, Sae] = {}
    seconds: dict[str, float] = {}
    for s in spec.saes:
        started = time.perf_counter()
        sae = load_sae(resolve_sae_location(s.path), format=s.format, device=None if s.stitch else spec.device)
        if s.stitch:
            from sae_runtime.stitch import Stitch, transfer_sae

            sae = transfer_sae(sae, Stitch.load(s.stitch)).to(spec.device)
        if s.hook_name:
            sae.cfg = sae.cfg.replace(hook_name=s.hook_name)
        saes[s.name] = sae
        seconds[s.name] = time.perf_counter() - started
    return saes, seconds
