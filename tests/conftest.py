"""Session-wide test settings (no Ray token auth, one torch thread on a 2-core machine) and the ONE
service every service-level test directory shares (tests/services, tests/reliability, tests/deploy).

The session builds real artifacts in a temp dir: a tiny Llama causal LM (save_pretrained), a
labelled SAE in the native format, a risk probe, a tiny LLaVA with a vision SAE, a tiny SDXL-Turbo
pipeline with a U-Net SAE; it writes a YAML config and serves it with ``services.app.start`` on one
in-process Ray instance, through the real gRPC and HTTP proxies on free localhost ports, with Ray's
Prometheus metrics on another free port. Replicas ask for 0.1 CPU. Ray starts on first use and
shuts down at the end of the session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# Tiny test models run faster single-threaded, and Ray replicas need the other core.
torch.set_num_threads(1)


@dataclass(frozen=True)
class Service:
    target: str
    metrics_url: str
    http_url: str  # the HTTP API (services/http) on Serve's HTTP proxy
    config_path: Path
    artifacts: Path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Model files on disk, in the formats users ship them in."""
    from tests.services.helpers import build_artifacts

    return build_artifacts(tmp_path_factory.mktemp("service_models"))


@pytest.fixture(scope="session")
def service(artifacts) -> Service:
    """Ray + Serve with the gRPC and HTTP proxies, serving the session's config; shut down at the end."""
    import ray
    from ray import serve

    from services.app import start
    from tests.services.helpers import free_port, service_config

    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    config_path = artifacts / "service.yaml"
    config_path.write_text(yaml.safe_dump(service_config(grpc_port, http_port)))
    ray_init = dict(
        address="local",  # always a fresh cluster of our own, never one found on the machine
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        start(config_path, ray_init_kwargs=ray_init)
        yield Service(
            f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{http_port}", config_path, artifacts
        )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def stub(service):
    """A raw grpcio stub of the Steering service on one channel to the session's service."""
    import grpc
    from steering.v1 import steering_pb2_grpc

    with grpc.insecure_channel(service.target) as channel:
        yield steering_pb2_grpc.SteeringStub(channel)


@pytest.fixture(scope="session")
def client(service):
    from services.client import SteeringClient

    with SteeringClient(service.target, timeout=120) as c:
        yield c


def _library_backend(service: Service, model: str):
    """``model`` loaded in the test process through the library: the independent code path."""
    from sae_runtime.backends.registry import build_backend
    from services.config import load_config

    return build_backend(load_config(service.config_path).model(model).to_spec(service.config_path.parent))


@pytest.fixture(scope="session")
def lm_backend(service):
    from tests.services.helpers import LM

    return _library_backend(service, LM)


@pytest.fixture(scope="session")
def vlm_backend(service):
    from tests.services.helpers import VLM

    return _library_backend(service, VLM)


@pytest.fixture(scope="session")
def image_backend(service):
    from tests.services.helpers import IMAGE

    return _library_backend(service, IMAGE)


@pytest.fixture(scope="session")
def dicts_backend(service):
    from tests.services.helpers import DICTS

    return _library_backend(service, DICTS)
