"""The backend registry: ModelSpec.kind -> backend class, imported only when that kind is built."""

from __future__ import annotations

import importlib
from dataclasses import replace

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


#: ModelSpec.kind -> (module, function) building that kind's mechanics demo on first use (cached).
DEMOS: dict[str, tuple[str, str]] = {
    "llava": ("sae_runtime.demo.multimodal", "ensure_llava_demo"),
    "sdxl_turbo": ("sae_runtime.demo.multimodal", "ensure_sdxl_demo"),
}


def demo_spec(spec: ModelSpec) -> ModelSpec:
    """The built-in demo of ``spec.kind`` (built from a fixed seed on first use, then cached in
    ``$SAE_DEMO_CACHE``), under the configured name, limits, dtype and device."""
    if spec.kind not in DEMOS:
        raise InvalidArgument(f"no built-in demo for kind {spec.kind!r}", field="demo")
    module, name = DEMOS[spec.kind]
    built: ModelSpec = getattr(importlib.import_module(module), name)()
    return replace(
        built,
        name=spec.name,
        description=spec.description or built.description,
        dtype=spec.dtype,
        device=spec.device,
        limits=spec.limits,
    )


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
