"""Deploy a Serve config file the way KubeRay does and call it over gRPC; print a JSON report.

    python tests/deploy/serve_config_check.py SERVE_CONFIG.yaml WORKDIR NUM_CPUS [PROMPTS_JSON]

Starts its own Ray head (``ray start --head --block``, free ports, its own temp dir and process
group), submits the file unchanged to the dashboard's Serve REST API (``serve deploy``, what KubeRay
does with a RayService's serveConfigV2), waits for grpc.health.v1 SERVING on the port the file
declares, then sends Health/Check, Ray Serve's Healthz, ListModels, a steered Generate and a
GenerateImage (and, for each prompt of the optional JSON list, a demo-lm Generate as the CLI sends
it: greedy, 16 new tokens, seed 0), and stops the cluster (never ``ray stop``, which would end every Ray on the machine).
tests/deploy/test_k8s_serve.py runs it inside a private network namespace, so the declared ports
cannot collide with anything else on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """The image's environment (Dockerfile ENV and its .pth), without Ray token auth."""
    out = dict(os.environ)
    out.update(RAY_AUTH_MODE="disabled", PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'gen'}",
               RAY_SERVE_USE_GRPC_BY_DEFAULT="1", RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="0",
               RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="0", RAY_SERVE_GRPC_MAX_MESSAGE_SIZE="67108864", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    out.pop("RAY_ADDRESS", None)
    return out


def start_head(workdir: Path, num_cpus: str, dashboard: int) -> subprocess.Popen:
    ports = [f"--port={free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
             f"--object-manager-port={free_port()}"]
    return subprocess.Popen(
        [str(RAY_BIN / "ray"), "start", "--head", "--block", "--include-dashboard=true", "--node-ip-address=127.0.0.1",
         f"--temp-dir={workdir / 'ray'}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats", *ports],
        env=env(), cwd=workdir, stdout=open(workdir / "ray.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_head(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head ends its node's processes
        head.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # whatever is left of this cluster's process group
    except ProcessLookupError:
        pass


def deploy(config_file: Path, dashboard: int, head: subprocess.Popen, deadline: float) -> float:
    started = time.time()
    while True:
        run = subprocess.run([str(RAY_BIN / "serve"), "deploy", str(config_file), "--address",
                              f"http://127.0.0.1:{dashboard}"], env=env(), capture_output=True, text=True)
        if run.returncode == 0:
            return time.time() - started
        if head.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"serve deploy failed: {run.stderr[-2000:]}")
        time.sleep(2)


def wait_serving(target: str, head: subprocess.Popen, deadline: float) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            if head.poll() is not None:
                raise RuntimeError("the Ray head exited")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(2)
    raise RuntimeError(f"{target} did not report SERVING within {START_TIMEOUT_S} s")


def calls(target: str, prompts: list[str]) -> dict:
    from services.client import Generation, SteeringClient, edit

    report: dict = {}
    with SteeringClient(target, timeout=120) as client:
        report["health"] = client.health()
        report["models"] = sorted(m.name for m in client.list_models())
        text = client.generate("demo-lm", "the", edits=[edit("concepts", "set", "color:red", value=60)],
                               include_default=True, seed=0)
        report["generate"] = {"steered": text.completion.text, "default": text.default_completion.text,
                              "was_steered": text.steered, "risk": text.risk.score}
        image = client.generate_image("demo-sdxl-turbo", "a red ball", num_inference_steps=1, seed=0)
        report["image_png_header"] = image.png[:8].hex()
        report["prompts"] = [
            {"prompt": p, "text": r.completion.text, "risk": r.risk.score}
            for p in prompts
            for r in [client.generate("demo-lm", p, generation=Generation(max_new_tokens=16), seed=0)]
        ]
    with grpc.insecure_channel(target) as channel:  # Ray Serve's own health RPC (KubeRay's probe)
        report["healthz"] = channel.unary_unary("/ray.serve.RayServeAPIService/Healthz")(b"", timeout=10).decode(
            "utf-8", "replace")
    return report


def main(config_path: str, workdir: str, num_cpus: str, prompts_json: str = "[]") -> int:
    work = Path(workdir)
    config = yaml.safe_load(Path(config_path).read_text())
    target = f"127.0.0.1:{config['grpc_options']['port']}"
    dashboard = free_port()
    report: dict = {"target": target}
    started = time.time()
    deadline = started + START_TIMEOUT_S
    head = start_head(work, num_cpus, dashboard)
    try:
        report["deploy_s"] = deploy(Path(config_path), dashboard, head, deadline)
        wait_serving(target, head, deadline)
        report["serving_after_s"] = time.time() - started
        report.update(calls(target, json.loads(prompts_json)))
    except Exception:  # noqa: BLE001 - reported to the test, with the cluster's log tail
        report["error"] = traceback.format_exc()[-3000:]
        log = work / "ray.log"
        report["ray_log"] = log.read_text()[-3000:] if log.is_file() else ""
    finally:
        stop_head(head)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
