"""Faults: a model replica's process killed under load, and SAE files that are corrupt or missing at
start-up.

- Kill: while clients keep loading two models, the LM replica's worker process gets SIGKILL. Ray
  Serve starts a new replica; meanwhile LM clients see only UNAVAILABLE (or success, for requests
  that waited for the new replica); the other model's clients see nothing but success; the time
  from the kill to the first request that succeeds after it is reported.
- Bad files: a second application (same Ray, its own name and route) serves a good model next to
  one whose SAE weights are corrupt and one whose SAE weights file is missing. Each broken model's
  deployment reports an error naming its file; the good model of that application, and the main
  application, keep serving. The application is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services.client import Generation, SteeringClient, edit
from tests.reliability.support import CHANNEL_OPTIONS, acall, call, deployment_pids, wait_until
from tests.services.helpers import LM, LM_SAE, VLM, png_bytes

OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Sample:
    model: str
    started: float  # time.monotonic()
    finished: float
    code: grpc.StatusCode
    details: str


async def load(target: str, done: asyncio.Event, workers: dict[str, int], samples: list[Sample]) -> None:
    """Closed-loop load until ``done`` is set: ``workers[model]`` concurrent clients per model."""
    requests = {
        LM: SteeringClient.text_request(LM, "the red cat", edits=[edit(LM_SAE, "set", 3, value=4.0)],
                                        generation=Generation(max_new_tokens=3), seed=1),
        VLM: SteeringClient.text_request(VLM, "what is it", image=png_bytes(7), generation=Generation(max_new_tokens=2), seed=1),
    }
    rpcs = {LM: "Generate", VLM: "GenerateMultimodal"}
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)

        async def client(model: str) -> None:
            while not done.is_set():
                started = time.monotonic()
                outcome = await acall(stub, rpcs[model], requests[model], timeout=60)
                samples.append(Sample(model, started, time.monotonic(), outcome.code, outcome.details))
                if outcome.code != OK:
                    await asyncio.sleep(0.05)  # a client backing off

        await asyncio.gather(*(client(model) for model, n in workers.items() for _ in range(n)))


def test_a_killed_replica_is_replaced_and_only_its_clients_see_unavailable_meanwhile(service):
    lm_pid = deployment_pids("steering")["model-lm"].pop()
    other_pids = {d: p for d, p in deployment_pids("steering").items() if d != "model-lm"}

    async def scenario() -> tuple[list[Sample], float]:
        samples: list[Sample] = []
        done = asyncio.Event()
        task = asyncio.ensure_future(load(service.target, done, {LM: 6, VLM: 2}, samples))
        await asyncio.sleep(2.0)  # steady load first
        killed_at = time.monotonic()
        os.kill(lm_pid, signal.SIGKILL)
        give_up = killed_at + 90.0
        while time.monotonic() < give_up and not any(s.model == LM and s.code == OK and s.started > killed_at for s in samples):
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # steady again
        done.set()
        await task
        return samples, killed_at

    samples, killed_at = asyncio.run(scenario())
    lm = [s for s in samples if s.model == LM]
    vlm = [s for s in samples if s.model == VLM]
    recovered = min((s.finished for s in lm if s.code == OK and s.started > killed_at), default=None)
    failed = [s for s in lm if s.code != OK]
    vlm_during = [s.finished - s.started for s in vlm if s.finished > killed_at and (recovered is None or s.started < recovered)]
    print(f"\nkill: {len(lm)} LM requests ({len(failed)} failed: {sorted({s.code.name for s in failed})}), "
          f"{len(vlm)} VLM requests (all OK: {all(s.code == OK for s in vlm)}, slowest while the LM recovered "
          f"{max(vlm_during, default=0):.2f} s); recovery {recovered - killed_at if recovered else float('nan'):.1f} s after SIGKILL")
    assert {s.code for s in lm} <= {OK, UNAVAILABLE}, sorted({(s.code.name, s.details[:200]) for s in failed})
    assert all(s.code == OK for s in vlm), sorted({(s.code.name, s.details[:200]) for s in vlm if s.code != OK})
    assert any(s.code == OK for s in lm if s.finished < killed_at)
    assert recovered is not None and recovered - killed_at < 60
    assert sum(s.code == OK for s in lm if s.started > recovered) > 10  # steady again
    new_pids = deployment_pids("steering")
    assert new_pids["model-lm"] and lm_pid not in new_pids["model-lm"]  # a new process serves the LM
    assert {d: p for d, p in new_pids.items() if d != "model-lm"} == other_pids  # nothing else restarted


# -- bad files at start-up ---------------------------------------------------------------------------
BROKEN_APP = "broken"


def lm_model(name: str, sae_dir) -> dict:
    return {"name": name, "kind": "causal_lm", "path": "lm", "saes": [{"name": LM_SAE, "path": str(sae_dir), "format": "native"}],
            "limits": {"max_new_tokens": 8}, "engine": {"max_running_rows": 4},
            "resources": {"num_cpus": 0.1, "torch_threads": 1}, "max_ongoing_requests": 8}


@pytest.fixture(scope="module")
def broken_app(service, tmp_path_factory):
    """Application ``broken`` beside the main one: models ``good``, ``corrupt`` (its SAE weights are
    not a safetensors file) and ``missing`` (its SAE weights file is gone). Yields the two bad
    files and the error ``serve.run`` raised; deletes the application afterwards."""
    from ray import serve

    from services.app import build_application
    from services.config import parse_config

    root = tmp_path_factory.mktemp("broken_files")
    good = service.artifacts / "saes" / LM_SAE
    shutil.copytree(good, root / "corrupt")
    (root / "corrupt" / "sae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    shutil.copytree(good, root / "missing")
    (root / "missing" / "sae.safetensors").unlink()
    config = parse_config({"app_name": BROKEN_APP, "ingress": {"num_cpus": 0.1},
                           "models": [lm_model("good", good), lm_model("corrupt", root / "corrupt"), lm_model("missing", root / "missing")]})
    started = time.monotonic()
    try:
        serve.run(build_application(config, service.artifacts), name=BROKEN_APP, route_prefix=f"/{BROKEN_APP}", blocking=False)
        deploy_error = None
    except RuntimeError as err:  # the application did not reach RUNNING
        deploy_error = str(err)
    failed = {"DEPLOY_FAILED", "UNHEALTHY"}
    settled = wait_until(lambda: all(serve.status().applications[BROKEN_APP].deployments[f"model-{m}"].status.name in failed
                                     for m in ("corrupt", "missing")), timeout=120, interval=0.5)
    print(f"\nbroken app settled in {time.monotonic() - started:.1f} s")
    assert settled
    try:
        yield {"corrupt": root / "corrupt" / "sae.safetensors", "missing": root / "missing" / "sae.safetensors"}, deploy_error
    finally:
        serve.delete(BROKEN_APP, _blocking=True)


def app_metadata(app: str) -> tuple[tuple[str, str], ...]:
    return (("application", app),)


def test_a_corrupt_or_missing_sae_file_fails_only_its_model_naming_the_file(service, broken_app):
    from ray import serve

    bad_files, deploy_error = broken_app
    status = serve.status().applications[BROKEN_APP]
    deployments = status.deployments
    for model, path in bad_files.items():
        d = deployments[f"model-{model}"]
        assert d.status.name in ("DEPLOY_FAILED", "UNHEALTHY"), d.status
        assert str(path) in d.message, d.message[-2000:]
    assert "corrupt or unreadable safetensors file" in deployments["model-corrupt"].message
    assert "missing file" in deployments["model-missing"].message
    assert deployments["model-good"].status.name == "HEALTHY" and deployments["ingress"].status.name == "HEALTHY"
    assert deploy_error is not None and "model-corrupt" in deploy_error or "model-missing" in deploy_error

    request = SteeringClient.text_request("good", "the cat", generation=Generation(max_new_tokens=2), seed=0)
    meta = app_metadata(BROKEN_APP)
    with grpc.insecure_channel(service.target, options=CHANNEL_OPTIONS) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        with ThreadPoolExecutor(3) as pool:  # a failed model's probe takes the probe timeout (5 s): in parallel
            names = ("good", "corrupt", "missing")
            checks = pool.map(lambda name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30, metadata=meta), names)
            serving = {name: check.status for name, check in zip(names, checks)}
        assert serving == {"good": SERVING, "corrupt": NOT_SERVING, "missing": NOT_SERVING}

        good = call(stub, "Generate", request, metadata=meta)
        assert good.code == OK and len(good.response.completion.tokens) == 2, good.details
        listed = call(stub, "ListModels", pb.ListModelsRequest(), timeout=30, metadata=meta)
        assert listed.code == OK and [m.name for m in listed.response.models] == ["good"], listed.details
        for model in bad_files:
            request.model = model
            outcome = call(stub, "Generate", request, timeout=30, metadata=meta)
            assert outcome.code == UNAVAILABLE and "failed to deploy" in outcome.details, (outcome.code, outcome.details)
        main = call(stub, "Generate", SteeringClient.text_request(LM, "the cat", generation=Generation(max_new_tokens=2)),
                    metadata=app_metadata("steering"))
        assert main.code == OK, main.details
