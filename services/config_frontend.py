"""The front-end parts of the service config: the gRPC and HTTP proxies, the bearer token and the
ingress deployment (``grpc:``, ``http:``, ``auth:``, ``ingress:``), and the strict base model every
config entry derives from (unknown keys are errors; entries are immutable)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Default cap on one gRPC message, request or response (the client's own limit): Ray Serve's proxy
#: would otherwise accept messages up to 2 GiB.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class GrpcEntry(Strict):
    port: int = Field(9000, ge=1, le=65535)
    request_timeout_s: float | None = Field(None, gt=0)
    #: The proxy's max_receive/max_send_message_length; a larger message is RESOURCE_EXHAUSTED.
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1 << 20, le=(1 << 31) - 1)


class HttpEntry(Strict):
    """The HTTP API (services/http) on Ray Serve's HTTP proxy. ``host`` is where ``python -m
    services.app`` listens (loopback by default, like a local gRPC client's target); rendered
    Serve configs for clusters listen on all interfaces."""

    port: int = Field(8000, ge=1, le=65535)
    host: str = "127.0.0.1"
    #: Larger request bodies are refused with 413 (the counterpart of grpc.max_message_bytes).
    max_body_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1 << 16, le=(1 << 31) - 1)


class AuthEntry(Strict):
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


class IngressEntry(Strict):
    num_cpus: float = Field(0.1, ge=0.0)
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)
    #: Serve every model inside the ingress replica (one Serve hop per request; the models scale
    #: with the ingress' replicas, which reserve the models' resources) rather than one deployment
    #: per model (two hops; each model scales on its own).
    colocate_models: bool = False
