"""What a backend is built from: a model directory (or hub id), its SAEs, its risk probe, its limits.

``services.config`` turns the YAML config into these; library users build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaeSpec:
    """One SAE to attach. ``path`` is a local directory (any supported format) or a hub id.

    ``hook_name`` overrides the hook site recorded in the SAE's own config (needed for formats
    that do not record one, e.g. the OpenAI-style TopK SAEs).
    """

    name: str
    path: str
    hook_name: str | None = None
    format: str | None = None  # None = detect from the directory's files
    #: A stitch directory (sae_runtime.stitch): ``path`` is then an SAE of the stitch's model A,
    #: transferred to this model at load time.
    stitch: str | None = None


@dataclass(frozen=True)
class Limits:
    """Per-request caps; exceeding one raises TooLarge (RESOURCE_EXHAUSTED) naming the field."""

    max_prompt_tokens: int = 512
    max_new_tokens: int = 256
    max_edits: int = 1024
    max_batch_size: int = 16
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_side: int = 1024
    max_inference_steps: int = 8


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: ``kind`` is causal_lm | llava | sdxl_turbo; ``path`` a directory or hub id."""

    name: str
    kind: str
    path: str
    saes: tuple[SaeSpec, ...] = ()
    risk_probe: str | None = None  # directory of a saved RiskProbe
    description: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    limits: Limits = Limits()
