"""One Ray instance and one Serve application for the whole services test session.

The session builds real artifacts in a temp dir: a tiny Llama causal LM (save_pretrained), a
labelled SAE in the native format, a risk probe, a tiny SDXL-Turbo pipeline with a U-Net SAE; it
writes a YAML config and serves it through the real gRPC proxy on a free localhost port, with
Ray's Prometheus metrics on another free port. Replicas ask for 0.1 CPU (2-core machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.services.helpers import (
    IMAGE,
    IMG_HOOK,
    IMG_LABELS,
    IMG_SAE,
    LM,
    LM_HOOK,
    LM_LABELS,
    LM_SAE,
    VLM,
    VLM_HOOK,
    VLM_LABELS,
    VLM_SAE,
    free_port,
    random_probe,
    random_sae,
    service_config,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Model files on disk, in the formats users ship them in."""
    from sae_runtime.demo.tiny_models import build_tiny_causal_lm, build_tiny_llava
    from sae_runtime.demo.tiny_sdxl import save_tiny_sdxl
    from sae_runtime.formats import save_native

    root = tmp_path_factory.mktemp("service_models")
    build_tiny_causal_lm(root / "lm", "llama", seed=0, hidden_size=32, num_layers=2, init_std=0.1)
    save_native(random_sae(32, 64, LM_HOOK, LM_LABELS, seed=1), root / "saes" / LM_SAE)
    random_probe(LM_SAE, 64, LM_LABELS, seed=2).save(root / "risk")
    build_tiny_llava(root / "llava", seed=0)
    save_native(random_sae(32, 64, VLM_HOOK, VLM_LABELS, seed=4), root / "saes" / VLM_SAE)
    save_tiny_sdxl(root / "sdxl", seed=0)
    save_native(random_sae(64, 128, IMG_HOOK, IMG_LABELS, seed=3), root / "saes" / IMG_SAE)
    return root


@dataclass(frozen=True)
class Service:
    target: str
    metrics_url: str
    config_path: Path
    artifacts: Path


@pytest.fixture(scope="session")
def service(artifacts) -> Service:
    """Ray + Serve with the gRPC proxy, serving the session's config; shut down at the end."""
    import ray
    from ray import serve

    from services.app import start

    grpc_port, metrics_port = free_port(), free_port()
    config_path = artifacts / "service.yaml"
    config_path.write_text(yaml.safe_dump(service_config(grpc_port)))
    ray_init = dict(
        address="local",  # always a fresh cluster of our own, never one found on the machine
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        start(config_path, ray_init_kwargs=ray_init, http_port=free_port())
        yield Service(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", config_path, artifacts)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def client(service):
    from services.client import SteeringClient

    with SteeringClient(service.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def lm_backend(service):
    """The same LM loaded in the test process through the library: the independent code path."""
    from services.backend_factory import build_backend
    from services.config import load_config

    config = load_config(service.config_path)
    return build_backend(config.model(LM).to_spec(service.config_path.parent))


@pytest.fixture(scope="session")
def vlm_backend(service):
    from services.backend_factory import build_backend
    from services.config import load_config

    config = load_config(service.config_path)
    return build_backend(config.model(VLM).to_spec(service.config_path.parent))


@pytest.fixture(scope="session")
def image_backend(service):
    from services.backend_factory import build_backend
    from services.config import load_config

    config = load_config(service.config_path)
    return build_backend(config.model(IMAGE).to_spec(service.config_path.parent))
