"""The reliability tests' service: the same artifacts and config as tests/services, on one in-process
Ray instance, through the real gRPC proxy.

pytest gives each conftest's fixtures their own session cache, so this directory cannot share the
instance that tests/services/conftest.py starts (that one lives until the end of the session and
would make a second ``ray.init`` here fail). Instead this Ray instance is stopped as soon as the
run leaves tests/reliability (:func:`pytest_runtest_teardown`), so the two never overlap. Moving
tests/services' ``artifacts``/``service``/``client`` fixtures into tests/conftest.py would let both
directories share one instance; these definitions would then go.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.services.conftest import Service
from tests.services.helpers import free_port, service_config

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

HERE = Path(__file__).resolve().parent
_stoppers: list = []


def _stop_service() -> None:
    while _stoppers:
        _stoppers.pop()()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of this directory (and its module fixtures' teardown), stop Ray before
    another directory starts its own."""
    result = yield
    if nextitem is None or HERE not in Path(str(nextitem.path)).resolve().parents:
        _stop_service()
    return result


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Tiny LM (+ SAE, risk probe), LLaVA (+ vision SAE) and SDXL-Turbo (+ U-Net SAE) saved to disk
    as users ship them: the same files tests/services and tests/deploy serve."""
    from tests.deploy.serving import build_artifacts

    return build_artifacts(tmp_path_factory.mktemp("reliability_models"))


@pytest.fixture(scope="session")
def service(artifacts) -> Service:
    """Ray + Serve with the gRPC proxy on a free loopback port, serving tests/services' config."""
    import ray
    from ray import serve

    from services.app import start

    grpc_port, metrics_port = free_port(), free_port()
    config_path = artifacts / "service.yaml"
    config_path.write_text(yaml.safe_dump(service_config(grpc_port)))
    ray_init = dict(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
                    log_to_driver=False, configure_logging=False)  # fmt: skip

    def stop() -> None:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    _stoppers.append(stop)
    start(config_path, ray_init_kwargs=ray_init, http_port=free_port())
    yield Service(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", config_path, artifacts)
    _stop_service()


@pytest.fixture(scope="session")
def client(service):
    from services.client import SteeringClient

    with SteeringClient(service.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def lm_backend(service):
    """The LM loaded in the test process through the library: the solo reference."""
    from services.backend_factory import build_backend
    from services.config import load_config
    from tests.services.helpers import LM

    config = load_config(service.config_path)
    return build_backend(config.model(LM).to_spec(service.config_path.parent))
