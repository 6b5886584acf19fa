"""The RayService manifests serve: the cpu-demo overlay's rendered ``serveConfigV2`` string, deployed
unchanged the way KubeRay hands it to its cluster (``serve deploy`` to the dashboard of a started
Ray head), answers Generate, GenerateImage and health checks over gRPC on the port it declares; the
gpu overlay's config resolves into deployments whose resource asks fit what its worker group offers.

The cluster is this test's own (tests/deploy/serve_config_check.py: free ports, its own temp dir
and process group, stopped at the end). It runs in a private network namespace (``unshare -n``,
root) so the ports the config declares (9000, 8000) cannot collide with a service already running
on the machine; the session's shared service (tests/conftest.py) is not touched. The config's paths
point into the image (``base_dir: /app/configs``, the Dockerfile's copy of the repository): where
/app does not exist it is a symlink to this checkout for the test's duration, so the string deploys
byte for byte as rendered.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from services.k8s_render import IMAGE_APP_DIR, REPO_ROOT
from tests.deploy.test_k8s import rayservice

CHECK = Path(__file__).resolve().parent / "serve_config_check.py"


@contextmanager
def image_layout() -> Iterator[None]:
    """/app is this checkout (as in the image) for the duration."""
    app = Path(str(IMAGE_APP_DIR))
    if app.exists():
        if (app / "services" / "app.py").resolve() != (REPO_ROOT / "services" / "app.py").resolve():
            pytest.fail(f"{app} exists and is not this checkout: the cpu-demo serveConfigV2 reads its files there")
        yield
        return
    app.symlink_to(REPO_ROOT, target_is_directory=True)
    try:
        yield
    finally:
        app.unlink()


def isolated_command(argv: list[str], ports: tuple[int, ...]) -> list[str]:
    """``argv`` in a fresh network namespace (only loopback) when this process may make one; else
    as is, provided the declared ports are free here."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0 and shutil.which("ip"):
        return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} (declared by serveConfigV2) is in use"
    return argv


@pytest.fixture(scope="module")
def cpu_demo_report() -> dict:
    service = rayservice("cpu-demo")
    text = service["spec"]["serveConfigV2"]
    config = yaml.safe_load(text)
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    work = Path(tempfile.mkdtemp(prefix="k8s-serve-"))
    (work / "serveConfigV2.yaml").write_text(text)  # the string exactly as KubeRay reads it from the manifest
    readme = (REPO_ROOT / "README.md").read_text()
    prompts = re.findall(r'generate --model demo-lm "(the owl lives in the river [^"]*)"', readme)
    argv = [sys.executable, str(CHECK), str(work / "serveConfigV2.yaml"), str(work), workers["rayStartParams"]["num-cpus"],
            json.dumps(prompts)]
    with image_layout():
        run = subprocess.run(isolated_command(argv, (config["grpc_options"]["port"], config["http_options"]["port"])),
                             capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert "error" not in report, report["error"] + "\n--- ray log ---\n" + report.get("ray_log", "")
    shutil.rmtree(work, ignore_errors=True)
    return {**report, "config": config}


def test_cpu_demo_serve_config_serves_generate_image_and_health(cpu_demo_report):
    r = cpu_demo_report
    assert r["target"] == f"127.0.0.1:{r['config']['grpc_options']['port']}" == "127.0.0.1:9000"
    assert r["health"] == "SERVING" and "success" in r["healthz"]
    assert r["models"] == sorted(m["name"] for m in r["config"]["applications"][0]["args"]["config"]["models"])
    g = r["generate"]
    assert g["was_steered"] and g["steered"] and g["steered"] != g["default"]
    assert 0.0 <= g["risk"] <= 1.0
    assert bytes.fromhex(r["image_png_header"]) == b"\x89PNG\r\n\x1a\n"


def test_the_readme_walk_through_risk_example_holds_on_the_deployed_demo(cpu_demo_report):
    """The README's owl prompts through the deployed service, as its CLI walk-through sends them:
    the grounded question answered from the context at a low risk, the ungrounded one answered
    anyway at the high risk the README quotes."""
    grounded, ungrounded = cpu_demo_report["prompts"]
    readme = (REPO_ROOT / "README.md").read_text()
    low = float(re.search(r"at a final risk of (\d\.\d\d)", readme)[1])
    high = float(re.search(r"says so: (\d\.\d\d)", readme)[1])
    assert grounded["text"].startswith("river") and abs(grounded["risk"] - low) < 0.01, grounded
    assert ungrounded["text"].startswith("red") and abs(ungrounded["risk"] - high) < 0.01, ungrounded


def test_gpu_serve_config_resolves_and_fits_its_worker_group():
    from ray._common.utils import import_attr

    service = rayservice("gpu")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    application = import_attr(app["import_path"])(app["args"])  # what Serve runs: builder + args
    ingress = application._bound_deployment
    models = [m._bound_deployment for m in ingress.init_args[0].values()]
    assert [m.name for m in models] and all(m.name.startswith("model-") for m in models)
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    offer_gpus = float(limits["nvidia.com/gpu"])
    offer_cpus = float(workers["rayStartParams"].get("num-cpus", limits["cpu"]))
    asks = [(d.ray_actor_options.get("num_cpus", 1.0), d.ray_actor_options.get("num_gpus", 0.0),
             d._deployment_config.num_replicas) for d in [ingress, *models]]
    for cpus, gpus, _ in asks:  # each replica fits on one worker
        assert cpus <= offer_cpus and gpus <= offer_gpus
    assert all(gpus > 0 for _, gpus, _ in asks[1:])  # every model replica runs on a GPU
    total_cpus = sum(c * n for c, _, n in asks)
    total_gpus = sum(g * n for _, g, n in asks)
    assert total_gpus <= offer_gpus * workers["minReplicas"]
    assert total_cpus <= offer_cpus * workers["minReplicas"]  # the head (num-cpus 0) runs no replica
