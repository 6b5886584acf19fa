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
    #: SAELens (release, sae_id), resolved through SAELens' registry instead of ``path``.
    saelens: tuple[str, str] | None = None
    #: A Neuronpedia explanation export (JSON) whose descriptions become the SAE's labels.
    labels: str | None = None
    #: Picks the SAE in a multi-SAE export: ``<modelId>/<layer>`` (default: the SAE's own neuronpedia_id).
    neuronpedia_id: str | None = None
    #: FF-KV dictionary of this decoder layer's MLP (built from the model, no file; ``path`` is then
    #: optional: a directory whose ``labels.json`` holds ``{"labels": {concept: neuron}}``).
    ffkv_layer: int | None = None
    ffkv_k: int | None = None  # FF-KV top-k (None = every neuron)
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
    max_inline_vector_dims: int = 16384  # floats over a request's inline steering vectors
    max_variants: int = 8  # TextRequest.variants entries
    max_vector_prompts: int = 64  # prompts per set in ComputeSteeringVector


@dataclass(frozen=True)
class EngineConfig:
    """The text engine's knobs (see :mod:`sae_runtime.engine`). Defaults suit 2 CPU cores.

    ``max_running_rows``: rows (sequences) decoding at once, the width of a decode forward.
    ``max_tokens_per_step``: prompt tokens prefilled plus rows decoded in one step; a step with
    nothing running admits at least one request whatever its length.
    ``max_kv_tokens``: reserved KV positions (prompt + max_new_tokens per row) over running rows.
    ``separate_process``: a text engine steps in a child process of the replica, with its own
    interpreter lock and its own copy of the weights (:mod:`sae_runtime.engine.process`).
    """

    max_running_rows: int = 16
    max_tokens_per_step: int = 2048
    max_kv_tokens: int = 65536
    separate_process: bool = False

    def __post_init__(self) -> None:
        from sae_runtime.errors import InvalidArgument

        for name in ("max_running_rows", "max_tokens_per_step", "max_kv_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"must be an integer >= 1, got {value!r}", field=f"engine.{name}")

    def check_fits(self, n_rows: int, reserved: int, field: str) -> None:
        """TooLarge when a request could never be admitted, even alone."""
        from sae_runtime.errors import TooLarge

        if n_rows > self.max_running_rows:
            raise TooLarge(f"{n_rows} rows exceed the engine's {self.max_running_rows} running rows", field=field)
        if reserved > self.max_kv_tokens:
            raise TooLarge(f"needs {reserved} KV tokens (prompt + max_new_tokens per row), over the engine's bound of "
                           f"{self.max_kv_tokens}", field=field)


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
    engine: EngineConfig = EngineConfig()
    #: Steering vectors declared in the config.
    vectors: tuple["VectorSpec", ...] = ()
    #: Named plans (edits, vectors, scope) requests may reference by name; validated at load.
    presets: tuple[tuple[str, object], ...] = ()  # (name, sae_runtime.plan.InterventionPlan)


@dataclass(frozen=True)
class VectorSpec:
    """A named steering vector: a safetensors file holding one 1-D tensor (key ``tensor_key``, or
    its only tensor), applied at hook site ``hook_name``."""

    name: str
    path: str
    hook_name: str
    tensor_key: str | None = None
