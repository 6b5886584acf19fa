"""The load-test tool against the real service on loopback (the session's service: tiny models
through the real gRPC proxy), its bounds and target policy, its statistics against numpy, and the
image's gRPC health probe."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from steering.v1 import steering_pb2 as pb

from services import loadtest
from services.healthcheck import main as healthcheck_main
from tests.services.helpers import IMAGE, LM, LM_LIMITS, SERVED_MODELS, VLM

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.loadtest", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def report_of(path: Path) -> dict:
    return json.loads(path.read_text())


# -- against the real service ------------------------------------------------------------------------
def test_mixed_load_succeeds_and_the_report_adds_up(service, tmp_path):
    report_path = tmp_path / "report.json"
    out = run_tool("--target", service.target, "--requests", "16", "--concurrency", "4", "--seed", "3",
                   "--mix", "steered=3,unsteered=1,stream=1,image=1,multimodal=1,encode=1", "--max-new-tokens", "4",
                   "--image-size", "64", "--deadline", "90", "--report", str(report_path))
    assert out.returncode == 0, out.stderr + out.stdout
    report = report_of(report_path)
    samples = report["samples"]
    assert report["requests"] == len(samples) == 16
    assert report["errors"] == {} and report["ok"] == 16, report["errors"]
    assert sum(k["requests"] for k in report["by_kind"].values()) == 16
    assert set(report["by_kind"]) <= {"steered", "unsteered", "stream", "image", "multimodal", "encode"}
    assert {"steered", "image", "multimodal"} <= set(report["by_kind"])
    # Figures recomputed from the raw samples with numpy (an independent percentile).
    latencies_ms = np.array([s["latency_s"] for s in samples]) * 1e3
    for q in (50, 95, 99):
        assert report["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(latencies_ms, q), rel=1e-9)
    assert report["throughput_rps"] == pytest.approx(16 / report["wall_s"])
    text = [s for s in samples if s["kind"] in ("steered", "unsteered", "stream")]
    assert all(s["tokens"] == 4 for s in text)  # max_new_tokens reached the model
    assert report["tokens_per_s"] == pytest.approx(sum(s["tokens"] for s in samples) / report["wall_s"])
    assert all(s["batch_size"] >= 1 for s in samples)  # every response carried the service's timings
    assert report["batch_size"]["max"] >= 1
    assert {m["name"] for m in report["models"]} == set(SERVED_MODELS)
    assert "throughput" in out.stdout and "p99" in out.stdout


def test_errors_are_counted_by_status(service, tmp_path):
    too_long = str(LM_LIMITS["max_new_tokens"] + 1)  # over the model's limit: RESOURCE_EXHAUSTED
    path = tmp_path / "limits.json"
    out = run_tool("--target", service.target, "--requests", "3", "--mix", "unsteered=1", "--model", LM,
                   "--max-new-tokens", too_long, "--report", str(path))
    assert out.returncode == 0, out.stderr
    assert report_of(path)["errors"] == {"RESOURCE_EXHAUSTED": 3}
    assert report_of(path)["latency_ms"]["p50"] is None  # percentiles cover successful requests only

    path = tmp_path / "deadline.json"
    out = run_tool("--target", service.target, "--requests", "4", "--concurrency", "2", "--mix", "steered=1",
                   "--model", LM, "--deadline", "0.001", "--report", str(path))
    assert out.returncode == 0, out.stderr
    report = report_of(path)
    assert report["errors"] == {"DEADLINE_EXCEEDED": 4} and report["ok"] == 0


def test_duration_bounds_the_run(service, tmp_path):
    path = tmp_path / "duration.json"
    started = time.monotonic()
    out = run_tool("--target", service.target, "--duration", "2", "--concurrency", "2", "--mix", "unsteered=1",
                   "--model", LM, "--max-new-tokens", "2", "--deadline", "20", "--report", str(path))
    assert out.returncode == 0, out.stderr
    report = report_of(path)
    assert report["settings"]["requests_bound"] == loadtest.MAX_REQUESTS
    assert 2.0 <= report["wall_s"] < 2.0 + 20 and time.monotonic() - started < 60
    assert report["requests"] >= 2 and report["errors"] == {}


def test_asking_for_a_kind_no_model_serves_is_refused(service, tmp_path):
    out = run_tool("--target", service.target, "--requests", "1", "--mix", "multimodal=1", "--model", LM,
                   "--report", str(tmp_path / "x.json"))
    assert out.returncode == 2 and "multimodal" in out.stderr and not (tmp_path / "x.json").exists()


def test_grpc_health_probe_of_the_image(service, capsys):
    assert healthcheck_main(["--target", service.target]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert healthcheck_main(["--target", service.target, "--service", LM]) == 0
    assert healthcheck_main(["--target", service.target, "--service", "no-such-model"]) == 1
    from tests.services.helpers import free_port

    assert healthcheck_main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1  # nothing listening


# -- target policy and bounds (no traffic is sent) ----------------------------------------------------
@pytest.mark.parametrize("target", ["192.0.2.10:9000", "[2001:db8::1]:9000", "host.invalid:9000"])
def test_non_loopback_targets_are_refused_before_any_connection(target, tmp_path):
    out = run_tool("--target", target, "--requests", "1", "--report", str(tmp_path / "r.json"), timeout=60)
    assert out.returncode == 2
    assert "refusing non-loopback target" in out.stderr and "--allow-remote" in out.stderr
    assert not (tmp_path / "r.json").exists()


def test_loopback_detection():
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert loadtest.is_loopback(host), host
    for host in ("10.0.0.1", "192.168.1.1", "8.8.8.8", "::ffff:10.0.0.1", "2001:db8::1", "host.invalid"):
        assert not loadtest.is_loopback(host), host
    assert loadtest.split_target("[::1]:9000") == ("::1", 9000)
    with pytest.raises(loadtest.UsageError):
        loadtest.split_target("localhost")


@pytest.mark.parametrize("args, message", [
    (["--requests", "0"], "--requests"),
    (["--requests", str(loadtest.MAX_REQUESTS + 1)], "--requests"),
    (["--duration", "4000"], "--duration"),
    (["--concurrency", "0"], "--concurrency"),
    (["--mix", "steered=1,bogus=2"], "unknown kind"),
    (["--mix", "steered=0"], "positive weight"),
])
def test_bad_bounds_and_mixes_are_refused(args, message, tmp_path):
    out = run_tool("--target", "127.0.0.1:1", *args, "--report", str(tmp_path / "r.json"), timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr


# -- pure parts -----------------------------------------------------------------------------------------
def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = rng.exponential(size=n).tolist()
        for q in (0, 50, 95, 99, 100):
            assert loadtest.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)


def models() -> list[pb.ModelInfo]:
    return [
        pb.ModelInfo(name="lm", kind="causal_lm", saes=[pb.SaeInfo(name="res", hook_name="blocks.0.hook_resid_post", width=64)]),
        pb.ModelInfo(name="vlm", kind="llava", saes=[pb.SaeInfo(name="clip", hook_name="vision.layers.1", width=32),
                                                     pb.SaeInfo(name="txt", hook_name="blocks.1.hook_resid_post", width=16)]),
        pb.ModelInfo(name="img", kind="sdxl_turbo", saes=[pb.SaeInfo(name="mid", hook_name="unet.mid_block.attentions.0", width=128)]),
    ]


def test_request_factory_draws_the_mix_with_a_fresh_edit_set_per_request():
    mix = loadtest.parse_mix("steered=3,unsteered=1,multimodal=1,image=1")
    factory = loadtest.RequestFactory(models(), mix, seed=7, max_edits=4)
    built = [factory.build() for _ in range(600)]
    counts = {k: sum(1 for kind, _, _ in built if kind == k) for k in mix}
    assert counts["steered"] == pytest.approx(300, abs=60) and counts["unsteered"] == pytest.approx(100, abs=40)
    widths = {s.name: s.width for m in models() for s in m.saes}
    plans = set()
    for kind, model, request in built:
        edits = list(request.plan.edits) if kind != "encode" else []
        if kind == "unsteered":
            assert not edits and model in ("lm", "vlm")
        if kind in ("steered", "image", "multimodal"):
            assert 1 <= len(edits) <= 4
        if kind == "image":
            assert model == "img" and isinstance(request, pb.GenerateImageRequest)
        if kind == "multimodal":
            assert model == "vlm" and request.image.startswith(b"\x89PNG")
        if kind == "steered" and model == "vlm":
            assert all(e.sae == "txt" for e in edits)  # no vision SAE edits without an image
        for e in edits:
            assert all(0 <= i < widths[e.sae] for i in e.latents)
        plans.add(request.plan.SerializeToString(deterministic=True) if kind != "encode" else b"")
    assert len(plans) > 300  # requests carry different edit sets
    again = loadtest.RequestFactory(models(), mix, seed=7, max_edits=4)
    assert [again.build()[2] for _ in range(20)] == [r for _, _, r in built[:20]]  # seeded


def test_default_mix_drops_kinds_without_a_model_but_an_explicit_one_is_refused():
    text_only = models()[:1]
    mix, dropped = loadtest.plan_mix(text_only, None)
    assert set(dropped) == {"image", "multimodal"} and mix["image"] == 0 and mix["steered"] > 0
    with pytest.raises(loadtest.UsageError, match="image"):
        loadtest.plan_mix(text_only, "steered=1,image=1")
