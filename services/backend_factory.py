"""Build a backend from a ModelSpec, importing only the module its ``kind`` needs."""

from __future__ import annotations

import importlib

from sae_runtime.backends.spec import ModelSpec
from sae_runtime.backends.types import Backend
from sae_runtime.errors import InvalidArgument

#: ModelSpec.kind -> (module, class). Modules are imported lazily: a causal-LM replica never
#: imports diffusers.
BACKENDS: dict[str, tuple[str, str]] = {
    "causal_lm": ("sae_runtime.backends.causal_lm", "CausalLmBackend"),
    "llava": ("sae_runtime.backends.llava", "LlavaBackend"),
    "sdxl_turbo": ("sae_runtime.backends.sdxl_turbo", "SdxlTurboBackend"),
}


def backend_class(kind: str) -> type[Backend]:
    if kind not in BACKENDS:
        raise InvalidArgument(f"unknown model kind {kind!r} (known: {', '.join(BACKENDS)})", field="kind")
    module, name = BACKENDS[kind]
    return getattr(importlib.import_module(module), name)


def build_backend(spec: ModelSpec) -> Backend:
    """Load the model, its SAEs and risk probe as the backend for ``spec.kind``."""
    cls = backend_class(spec.kind)
    from_spec = getattr(cls, "from_spec", None)
    return from_spec(spec) if from_spec is not None else cls(spec)
