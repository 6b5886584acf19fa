"""A real service in a child process, for the deploy tests: tiny models written to disk, a YAML
config, and `services.app`'s own builders run by a small launcher on a Ray cluster of its own.

A child process with ``ray.init(address="local")`` keeps this cluster apart from the in-process
cluster of tests/services (which must not find and join ours), and free HTTP/gRPC ports keep the
two proxies apart. The launcher stops Serve and Ray on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.services.helpers import (
    IMAGE,
    IMG_HOOK,
    IMG_LABELS,
    IMG_SAE,
    LM,
    LM_HOOK,
    LM_LABELS,
    LM_LIMITS,
    LM_SAE,
    VLM,
    VLM_HOOK,
    VLM_LABELS,
    VLM_SAE,
    free_port,
    random_probe,
    random_sae,
)

REPO = Path(__file__).resolve().parents[2]

LAUNCHER = r"""
import os, signal, sys, threading
import ray
from ray import serve
from services.app import build_application, export_ray_env, grpc_options
from services.config import load_config

config_path, http_port = sys.argv[1], int(sys.argv[2])
config = load_config(config_path)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
export_ray_env(config)
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
try:
    serve.start(grpc_options=grpc_options(config), http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_application(config, os.path.dirname(os.path.abspath(config_path))), name=config.app_name,
              route_prefix="/", blocking=False)
    print("SERVING", flush=True)
    stop.wait()
finally:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
"""


def build_artifacts(root: Path) -> Path:
    """Under ``root``: a tiny Llama LM (+ SAE, risk probe), a tiny LLaVA (+ vision SAE) and a tiny
    SDXL-Turbo (+ U-Net SAE), saved as users ship them."""
    from sae_runtime.demo.tiny_models import build_tiny_causal_lm, build_tiny_llava
    from sae_runtime.demo.tiny_sdxl import save_tiny_sdxl
    from sae_runtime.formats import save_native

    build_tiny_causal_lm(root / "lm", "llama", seed=0, hidden_size=32, num_layers=2, init_std=0.1)
    save_native(random_sae(32, 64, LM_HOOK, LM_LABELS, seed=1), root / "saes" / LM_SAE)
    random_probe(LM_SAE, 64, LM_LABELS, seed=2).save(root / "risk")
    build_tiny_llava(root / "llava", seed=0)
    save_native(random_sae(32, 64, VLM_HOOK, VLM_LABELS, seed=4), root / "saes" / VLM_SAE)
    save_tiny_sdxl(root / "sdxl", seed=0)
    save_native(random_sae(64, 128, IMG_HOOK, IMG_LABELS, seed=3), root / "saes" / IMG_SAE)
    return root


def deploy_config(grpc_port: int) -> dict:
    """The three tiny models at 0.1 CPU per replica (2-core machine), batching on."""
    small = {"num_cpus": 0.1, "torch_threads": 1}
    return {
        "grpc": {"port": grpc_port, "request_timeout_s": 120},
        "ingress": {"num_cpus": 0.1},
        "models": [
            {"name": LM, "kind": "causal_lm", "path": "lm", "risk_probe": "risk",
             "saes": [{"name": LM_SAE, "path": f"saes/{LM_SAE}", "format": "native"}],
             "limits": LM_LIMITS, "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
             "resources": small, "max_ongoing_requests": 64},
            {"name": VLM, "kind": "llava", "path": "llava", "saes": [{"name": VLM_SAE, "path": f"saes/{VLM_SAE}"}],
             "limits": {"max_new_tokens": 16, "max_batch_size": 8, "max_image_bytes": 10_000, "max_image_side": 64},
             "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}, "resources": small},
            {"name": IMAGE, "kind": "sdxl_turbo", "path": "sdxl", "saes": [{"name": IMG_SAE, "path": f"saes/{IMG_SAE}"}],
             "limits": {"max_inference_steps": 2, "max_image_side": 64, "max_batch_size": 4},
             "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}, "resources": small},
        ],
    }


@dataclass
class ChildService:
    target: str
    config_path: Path
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def start_child_service(root: Path, config: dict | None = None, *, timeout_s: float = 240.0) -> ChildService:
    """Write ``config`` (default: :func:`deploy_config`) next to the artifacts in ``root``,
    start the launcher and wait until the gRPC health check answers SERVING."""
    from services.healthcheck import check

    grpc_port = free_port()
    data = config if config is not None else deploy_config(grpc_port)
    data.setdefault("grpc", {})["port"] = grpc_port
    config_path = root / "service.yaml"
    config_path.write_text(yaml.safe_dump(data))
    log_path = root / "service.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(config_path), str(free_port())],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    service = ChildService(f"127.0.0.1:{grpc_port}", config_path, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if check(service.target, timeout=2.0)[0]:
            return service
        time.sleep(1.0)
    service.stop()
    raise RuntimeError(f"service not SERVING after {timeout_s:.0f} s:\n{log_path.read_text()[-4000:]}")
