"""The service's YAML config: a pydantic schema, loading, and the two things built from it.

One file declares the models to serve (base model, SAEs, risk probe, limits, batching, resources,
replicas), the gRPC port and an optional bearer token. From it come:

- :meth:`ModelConfig.to_spec`: the ``sae_runtime`` :class:`ModelSpec` a backend is built from;
- :func:`render_serve_config`: a Ray Serve config dict (``applications`` + ``grpc_options``), the
  body of a ``serve deploy`` file or of a KubeRay RayService's ``serveConfigV2``.

Relative local paths are relative to ``base_dir``: the config file's directory by default.
Example (configs/demo.yaml)::

    grpc: {port: 9000}
    models:
      - name: demo-lm
        kind: causal_lm
        path: ../models/demo-lm/model
        saes:
          - {name: concepts, path: ../models/demo-lm/saes/concepts}
        risk_probe: ../models/demo-lm/risk
        batching: {max_batch_size: 8, batch_wait_timeout_s: 0.0}
        resources: {num_cpus: 1}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec

#: The import path of the application builder, for Serve config files.
APP_IMPORT_PATH = "services.app:build_app"
#: gRPC servicers the proxy registers: the Steering API and the standard health service.
GRPC_SERVICER_FUNCTIONS = (
    "steering.v1.steering_pb2_grpc.add_SteeringServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """The config file is missing, not YAML, or fails validation. The message names each field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        if getattr(self, "demo", False) or getattr(self, "transfer", None) is not None:
            return self  # ModelConfig._consistent checks demo entries, SaeEntry transferred ones
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of 'path' or 'hub_id'")
        return self

    def location(self, base_dir: Path) -> str:
        if self.hub_id is not None:
            return self.hub_id
        return str((base_dir / os.path.expanduser(self.path)).resolve())


class TransferEntry(_Strict):
    """An SAE of another model carried over by a stitch (sae_runtime.stitch), at load time."""

    sae: str  # local path of the SAE on the stitch's model A
    stitch: str  # local path of the stitch directory


class SaeEntry(_Located):
    name: str
    format: str | None = None  # None = detect from the files; the loader rejects unknown formats
    hook_name: str | None = None  # overrides the hook recorded in the SAE's own config
    transfer: TransferEntry | None = None  # instead of path / hub_id

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value)

    @model_validator(mode="after")
    def _transfer_alone(self):
        if self.transfer is not None and (self.path is not None or self.hub_id is not None):
            raise ValueError("give 'transfer' instead of 'path' / 'hub_id', not with them")
        return self

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


class BatchingEntry(_Strict):
    """Batching per replica (services/batching.py): requests queued while the replica is busy, up to
    ``max_batch_size``, share the next pass; a batch that is not full waits up to
    ``batch_wait_timeout_s`` for company once the replica is free."""

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0)


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
    batching: BatchingEntry = BatchingEntry()
    resources: ResourcesEntry = ResourcesEntry()
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingEntry | None = None  # replaces num_replicas when set
    max_ongoing_requests: int = Field(32, ge=1)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value)

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
        if self.batching.max_batch_size > self.limits.max_batch_size:
            raise ValueError(
                f"batching.max_batch_size ({self.batching.max_batch_size}) exceeds limits.max_batch_size "
                f"({self.limits.max_batch_size})"
            )
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= batching.max_batch_size, or batches never fill")
        if self.device.startswith("cuda") and self.resources.num_gpus <= 0:
            raise ValueError("device 'cuda' needs resources.num_gpus > 0")
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
            saes=tuple(
                SaeSpec(name=s.name, path=s.location(base_dir), hook_name=s.hook_name, format=s.format, stitch=s.stitch_location(base_dir))
                for s in self.saes
            ),
            risk_probe=probe,
            description=self.description,
            dtype=self.dtype,
            device=self.device,
            limits=Limits(**self.limits.model_dump()),
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


#: Default cap on one gRPC message, request or response (the client's own limit): Ray Serve's proxy
#: would otherwise accept messages up to 2 GiB.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class GrpcEntry(_Strict):
    port: int = Field(9000, ge=1, le=65535)
    request_timeout_s: float | None = Field(None, gt=0)
    #: The proxy's max_receive/max_send_message_length; a larger message is RESOURCE_EXHAUSTED.
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1 << 20, le=(1 << 31) - 1)


class AuthEntry(_Strict):
    """Optional bearer token (``authorization: Bearer <token>`` metadata) for Steering RPCs.

    Prefer ``bearer_token_env`` (the name of an environment variable read by the ingress replica)
    to a literal ``bearer_token``, which would end up in rendered Serve configs.
    """

    bearer_token: str | None = Field(None, min_length=8)
    bearer_token_env: str | None = None

    @model_validator(mode="after")
    def _at_most_one(self):
        if self.bearer_token is not None and self.bearer_token_env is not None:
            raise ValueError("give at most one of 'bearer_token' or 'bearer_token_env'")
        return self


class IngressEntry(_Strict):
    num_cpus: float = Field(0.1, ge=0.0)
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)


class ServiceConfig(_Strict):
    app_name: str = "steering"
    grpc: GrpcEntry = GrpcEntry()
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


def render_serve_config(config: ServiceConfig, *, base_dir: str | os.PathLike[str], http_port: int = 8000) -> dict[str, Any]:
    """A Ray Serve config (ServeDeploySchema) serving ``config``: one application whose builder
    receives the whole validated config as args, plus the gRPC proxy options.

    ``base_dir`` is where relative paths in the config resolve on the machines that run the
    replicas (for Kubernetes: the config directory inside the image).
    """
    grpc_options: dict[str, Any] = {"port": config.grpc.port, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)}
    if config.grpc.request_timeout_s is not None:
        grpc_options["request_timeout_s"] = config.grpc.request_timeout_s
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": http_port},
        "grpc_options": grpc_options,
        "applications": [
            {
                "name": config.app_name,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": {"config": config.model_dump(mode="json", exclude_defaults=True), "base_dir": str(base_dir)},
            }
        ],
    }
