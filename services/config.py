"""The service's YAML config: a pydantic schema, loading, and the two things built from it.

One file declares the models to serve (base model, SAEs, risk probe, limits, engine, resources,
replicas), the gRPC and HTTP ports and an optional bearer token. From it come:

- :meth:`ModelConfig.to_spec`: the ``sae_runtime`` :class:`ModelSpec` a backend is built from;
- :func:`services.k8s_render.render_serve_config`: a Ray Serve config dict (``applications`` +
  ``grpc_options``), the body of a ``serve deploy`` file or of a KubeRay RayService's ``serveConfigV2``.

Relative local paths are relative to ``base_dir``: the config file's directory by default.
Example (configs/demo.yaml)::

    grpc: {port: 9000}
    models:
      - name: demo-lm
        kind: causal_lm
        path: ../models/demo-lm/model
        saes:
          - {name: concepts, path: ../models/demo-lm/saes/concepts}
          - {name: kv, ffkv: {layer: 2, k: 32}}   # the MLP's own neurons (FF-KV), no file
        risk_probe: ../models/demo-lm/risk
        presets:                                   # named plans, written as a request's plan in proto JSON
          red: {edits: [{sae: concepts, op: EDIT_OP_SET, labels: ["color:red"], value: 60}]}
        vectors:                                   # steering vectors: safetensors, one 1-D tensor
          honest: {path: vectors/honest.safetensors, hook_name: blocks.2.hook_resid_post}
        engine: {max_running_rows: 16}
        resources: {num_cpus: 1}
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from sae_runtime.backends.spec import EngineConfig, Limits, ModelSpec, SaeSpec
from services.config_frontend import DEFAULT_MAX_MESSAGE_BYTES, AuthEntry, GrpcEntry, HttpEntry, IngressEntry  # noqa: F401 - re-exported
from services.config_frontend import Strict as _Strict
from services.config_steering import PRESET_KEYS, VectorEntry, check_preset_names, preset_plan  # noqa: F401 - re-exported

#: The import path of the application builder, for Serve config files.
#: gRPC servicers the proxy registers: the Steering API, the standard health service, and server
#: reflection v1 (Ray Serve serves v1alpha itself).
GRPC_SERVICER_FUNCTIONS = (
    "steering.v1.steering_pb2_grpc.add_SteeringServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "services.reflection.add_ReflectionV1Servicer_to_server",
)
#: How to install what ``saelens:`` SAE entries need (sae_runtime.formats.saelens_registry).
SAELENS_EXTRA = "pip install 'sae-steering[saelens]'"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """The config file is missing, not YAML, or fails validation. The message names each field."""


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


class _Located(_Strict):
    """Something loaded from a local ``path`` or a hub id (exactly one of the two)."""

    path: str | None = None
    hub_id: str | None = None

    @model_validator(mode="after")
    def _one_location(self):
        if getattr(self, "demo", False):
            return self  # ModelConfig._consistent checks demo entries
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of 'path' or 'hub_id'")
        return self

    def location(self, base_dir: Path) -> str:
        if self.hub_id is not None:
            return self.hub_id
        return str((base_dir / os.path.expanduser(self.path)).resolve())


class SaelensName(_Strict):
    """An SAE named as in SAELens: ``{release: gemma-scope-2b-pt-res-canonical, sae_id: layer_20/width_16k/canonical}``."""

    release: str = Field(min_length=1)
    sae_id: str = Field(min_length=1)


class FfkvEntry(_Strict):
    """An FF-KV dictionary: the MLP neurons of decoder layer ``layer`` (optional top-``k``)."""

    layer: int = Field(ge=0)
    k: int | None = Field(None, ge=1)


class TransferEntry(_Strict):
    """An SAE of another model carried over by a stitch (sae_runtime.stitch), at load time."""

    sae: str  # local path of the SAE on the stitch's model A
    stitch: str  # local path of the stitch directory


class SaeEntry(_Located):
    name: str
    format: str | None = None  # None = detect from the files; the loader rejects unknown formats
    hook_name: str | None = None  # overrides the hook recorded in the SAE's own config
    #: Instead of path/hub_id: a SAELens release + sae_id (needs the optional extra sae-lens).
    saelens: SaelensName | None = None
    #: A Neuronpedia explanation export (JSON) whose descriptions become the SAE's labels.
    labels: str | None = None
    #: ``<modelId>/<layer>`` of the SAE in a multi-SAE export (default: the SAE's own neuronpedia_id).
    neuronpedia_id: str | None = None
    #: Built from the model's MLP; ``path`` is then optional (a directory with ``labels.json``).
    ffkv: FfkvEntry | None = None
    transfer: TransferEntry | None = None  # instead of path / hub_id

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value)

    @model_validator(mode="after")
    def _one_location(self):
        if self.transfer is not None:
            if self.path is not None or self.hub_id is not None or self.saelens is not None or self.ffkv is not None:
                raise ValueError("give 'transfer' instead of 'path' / 'hub_id', not with them")
            return self
        if self.ffkv is not None:
            if self.hub_id is not None or self.saelens is not None:
                raise ValueError("an ffkv entry is built from the model: give no hub_id or saelens (path: an optional labels directory)")
            return self
        if sum(x is not None for x in (self.path, self.hub_id, self.saelens)) != 1:
            raise ValueError("give exactly one of 'path', 'hub_id' or 'saelens'")
        if self.saelens is not None and importlib.util.find_spec("sae_lens") is None:
            raise ValueError(f"saelens: {{release, sae_id}} needs the optional extra sae-lens, which is not "
                             f"installed: {SAELENS_EXTRA}")
        return self

    def to_spec(self, base_dir: Path) -> SaeSpec:
        labels = None if self.labels is None else str((base_dir / os.path.expanduser(self.labels)).resolve())
        return SaeSpec(
            name=self.name,
            path="" if self.saelens is not None or (self.ffkv is not None and self.path is None) else self.location(base_dir),
            hook_name=self.hook_name,
            format=self.format,
            saelens=None if self.saelens is None else (self.saelens.release, self.saelens.sae_id),
            labels=labels,
            neuronpedia_id=self.neuronpedia_id,
            ffkv_layer=self.ffkv.layer if self.ffkv else None,
            ffkv_k=self.ffkv.k if self.ffkv else None,
            stitch=self.stitch_location(base_dir),
        )

    def location(self, base_dir: Path) -> str:
        if self.transfer is not None:
            return str((base_dir / os.path.expanduser(self.transfer.sae)).resolve())
        return super().location(base_dir)

    def stitch_location(self, base_dir: Path) -> str | None:
        return None if self.transfer is None else str((base_dir / os.path.expanduser(self.transfer.stitch)).resolve())


class LimitsEntry(_Strict):
    """Per-request caps (sae_runtime Limits); exceeding one is RESOURCE_EXHAUSTED."""

    max_prompt_tokens: int = Field(Limits.max_prompt_tokens, ge=1)
    max_new_tokens: int = Field(Limits.max_new_tokens, ge=1)
    max_edits: int = Field(Limits.max_edits, ge=0)
    max_batch_size: int = Field(Limits.max_batch_size, ge=1)
    max_image_bytes: int = Field(Limits.max_image_bytes, ge=1)
    max_image_side: int = Field(Limits.max_image_side, ge=8)
    max_inference_steps: int = Field(Limits.max_inference_steps, ge=1)
    max_inline_vector_dims: int = Field(Limits.max_inline_vector_dims, ge=0)
    max_variants: int = Field(Limits.max_variants, ge=0)
    max_vector_prompts: int = Field(Limits.max_vector_prompts, ge=1)


class EngineEntry(_Strict):
    """The replica's engine (sae_runtime.engine): text rows decoding at once, prompt + decode tokens
    per step, reserved KV tokens; image models run request-level batches of up to
    ``max_running_rows`` requests. ``separate_process``: a text model's engine steps in a child
    process of the replica (its own interpreter lock; a second copy of the weights)."""

    max_running_rows: int = Field(EngineConfig.max_running_rows, ge=1, le=256)
    max_tokens_per_step: int = Field(EngineConfig.max_tokens_per_step, ge=1)
    max_kv_tokens: int = Field(EngineConfig.max_kv_tokens, ge=1)
    separate_process: bool = EngineConfig.separate_process


class ResourcesEntry(_Strict):
    """Ray resources per replica. Fractions are allowed (e.g. 0.5 CPU on a small machine)."""

    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    torch_threads: int | None = Field(None, ge=1)  # torch intra-op threads in the replica


class AutoscalingEntry(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


#: Kinds with a built-in mechanics demo (tiny random model + briefly trained SAEs, built from a
#: fixed seed on first start and cached): ``demo: true`` instead of ``path``/``hub_id``.
DEMO_KINDS = ("llava", "sdxl_turbo")


class ModelConfig(_Located):
    name: str
    kind: Literal["causal_lm", "llava", "sdxl_turbo"]
    demo: bool = False
    description: str = ""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    saes: tuple[SaeEntry, ...] = ()
    risk_probe: str | None = None  # directory of a saved RiskProbe
    limits: LimitsEntry = LimitsEntry()
    engine: EngineEntry = EngineEntry()
    resources: ResourcesEntry = ResourcesEntry()
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingEntry | None = None  # replaces num_replicas when set
    max_ongoing_requests: int = Field(32, ge=1)
    #: Steering vectors by name (VectorEdit.vector).
    vectors: dict[str, VectorEntry] = Field(default_factory=dict)
    #: Named plans by name (InterventionPlan.presets), each as a request's plan in proto JSON.
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("vectors", "presets")
    @classmethod
    def _valid_keys(cls, value: dict) -> dict:
        for key in value:
            _check_name(key)
        return value

    @field_validator("presets", mode="before")
    @classmethod
    def _valid_presets(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, body in value.items():
                preset_plan(str(name), body)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", value):
            raise ValueError("must be 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.demo:
            if self.kind not in DEMO_KINDS:
                raise ValueError(f"demo: true is available for kinds {', '.join(DEMO_KINDS)}")
            if self.path is not None or self.hub_id is not None or self.saes or self.risk_probe is not None:
                raise ValueError("a demo model brings its own files: give no path, hub_id, saes or risk_probe")
        names = [s.name for s in self.saes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate SAE names: {', '.join(dupes)}")
        if self.max_ongoing_requests < self.engine.max_running_rows:
            raise ValueError("max_ongoing_requests must be >= engine.max_running_rows, or the running rows never fill")
        if self.device.startswith("cuda") and self.resources.num_gpus <= 0:
            raise ValueError("device 'cuda' needs resources.num_gpus > 0")
        if self.presets and not self.demo:
            for name, body in self.presets.items():
                check_preset_names(preset_plan(name, body), name, set(names), set(self.vectors))
        return self

    def to_spec(self, base_dir: Path) -> ModelSpec:
        """The backend build spec, with relative paths resolved against ``base_dir``. For a demo
        model ``path`` is empty: the replica builds (or finds cached) the demo and fills it in."""
        probe = None
        if self.risk_probe is not None:
            probe = str((base_dir / os.path.expanduser(self.risk_probe)).resolve())
        return ModelSpec(
            name=self.name,
            kind=self.kind,
            path="" if self.demo else self.location(base_dir),
            saes=tuple(s.to_spec(base_dir) for s in self.saes),
            risk_probe=probe,
            description=self.description,
            dtype=self.dtype,
            device=self.device,
            limits=Limits(**self.limits.model_dump()),
            engine=EngineConfig(**self.engine.model_dump()),
            vectors=tuple(v.to_spec(name, base_dir) for name, v in self.vectors.items()),
            presets=tuple((name, preset_plan(name, body)) for name, body in self.presets.items()),
        )

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve ``.options(...)`` for this model's deployment."""
        options: dict[str, Any] = {
            "name": f"model-{self.name}",
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.resources.num_cpus, "num_gpus": self.resources.num_gpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.autoscaling.min_replicas,
                "max_replicas": self.autoscaling.max_replicas,
                "target_ongoing_requests": self.autoscaling.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.num_replicas
        return options


class ServiceConfig(_Strict):
    app_name: str = "steering"
    grpc: GrpcEntry = GrpcEntry()
    http: HttpEntry = HttpEntry()
    auth: AuthEntry = AuthEntry()
    ingress: IngressEntry = IngressEntry()
    models: tuple[ModelConfig, ...] = Field(min_length=1)

    @field_validator("app_name")
    @classmethod
    def _valid_app_name(cls, value: str) -> str:
        return _check_name(value)

    @model_validator(mode="after")
    def _unique_models(self):
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _colocatable(self):
        """Colocated models live in the ingress' replicas: they do not scale on their own, and they
        share one process' torch thread pool."""
        if not self.ingress.colocate_models:
            return self
        bad = [f"models.{n}.{key}" for n, m in enumerate(self.models)
               for key, set_ in (("num_replicas", m.num_replicas != 1), ("autoscaling", m.autoscaling is not None)) if set_]
        if bad:
            raise ValueError(f"ingress.colocate_models: colocated models scale with ingress.num_replicas; remove {', '.join(bad)}")
        if len({m.resources.torch_threads for m in self.models}) > 1:
            raise ValueError("ingress.colocate_models: colocated models share one process; give every models.N.resources.torch_threads the same value")
        return self

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def parse_config(data: Any, *, source: str = "config") -> ServiceConfig:
    """Validate a parsed YAML/JSON mapping; raise ConfigError listing every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: invalid config"]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {where}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_config(data, source=str(p))
