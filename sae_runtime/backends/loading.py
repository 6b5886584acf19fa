"""Loading the SAEs a ModelSpec names, shared by the backends' ``from_spec``."""

from __future__ import annotations

import time

from sae_runtime.backends.spec import ModelSpec
from sae_runtime.saes.base import Sae


def load_spec_saes(spec: ModelSpec) -> tuple[dict[str, Sae], dict[str, float]]:
    """The SAEs of ``spec`` (name -> Sae on ``spec.device``, ``hook_name`` overrides applied) and
    how long each took to load, in seconds (reported by the service as a metric)."""
    from sae_runtime.formats import load_sae

    saes: dict[str, Sae] = {}
    seconds: dict[str, float] = {}
    for s in spec.saes:
        started = time.perf_counter()
        sae = load_sae(s.path, format=s.format, device=spec.device)
        if s.hook_name:
            sae.cfg = sae.cfg.replace(hook_name=s.hook_name)
        saes[s.name] = sae
        seconds[s.name] = time.perf_counter() - started
    return saes, seconds
