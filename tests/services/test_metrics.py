"""The service's metrics appear on Ray's Prometheus endpoint and count what the test did."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.client import Generation, SteeringError, edit
from tests.services.helpers import LM, LM_SAE

DEADLINE_S = 90


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def total(families: dict, name: str, suffix: str = "", **labels) -> float:
    """Sum of the samples of ``name`` (sample name ``name + suffix``) whose labels include ``labels``."""
    family = families.get(name)
    if family is None:
        return 0.0
    return sum(
        s.value
        for s in family.samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_endpoint_counts_requests_latencies_batches_tokens_and_risk(service, client):
    before = scrape(service.metrics_url)
    ok_before = total(before, "ray_steering_requests", "_total", model=LM, method="Generate", status="OK")
    tokens_before = total(before, "ray_steering_tokens_generated", "_total", model=LM)

    steered = client.generate(LM, "the cat", edits=[edit(LM_SAE, "set", 3, value=5.0)], generation=Generation(max_new_tokens=4), seed=0)
    plain = client.generate(LM, "the cat", generation=Generation(max_new_tokens=4), seed=0)
    with pytest.raises(SteeringError):
        client.generate("no-such-model", "the")
    generated = len(steered.completion.tokens) + len(plain.completion.tokens)

    deadline = time.monotonic() + DEADLINE_S
    while True:
        families = scrape(service.metrics_url)
        checks = {
            "ok requests": total(families, "ray_steering_requests", "_total", model=LM, method="Generate", status="OK") >= ok_before + 2,
            "not found": total(families, "ray_steering_requests", "_total", model="(unknown)", method="Generate", status="NOT_FOUND") >= 1,
            "tokens": total(families, "ray_steering_tokens_generated", "_total", model=LM) >= tokens_before + generated,
            "steered": total(families, "ray_steering_generations", "_total", model=LM, steered="true") >= 1,
            "unsteered": total(families, "ray_steering_generations", "_total", model=LM, steered="false") >= 1,
            "queue": total(families, "ray_steering_queue_ms", "_count", model=LM, method="generate") >= 2,
            "compute": total(families, "ray_steering_compute_ms", "_count", model=LM, method="generate") >= 2,
            "batch sizes": total(families, "ray_steering_batch_size", "_count", model=LM, method="generate") >= 2,
            "risk": total(families, "ray_steering_risk_score", "_count", model=LM) >= 2,
            "load time": total(families, "ray_steering_model_load_seconds", "_count", model=LM) >= 1,
            "SAE load time": total(families, "ray_steering_sae_load_seconds", "_count", model=LM, sae=LM_SAE) >= 1,
            "latency": total(families, "ray_steering_request_latency_ms", "_count", model=LM, method="Generate") >= 2,
            "serve's own gRPC counter": total(families, "ray_serve_num_grpc_requests", "_total") >= 3,
        }
        if all(checks.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(checks.values()), {k: v for k, v in checks.items() if not v}

    # histogram buckets are cumulative and end with +Inf == count, in every series (one per replica
    # process that reported: a replica restarted by another test directory adds one)
    family = families["ray_steering_batch_size"]
    series: dict[tuple, list[tuple[float, float]]] = {}
    for sample in family.samples:
        if sample.name.endswith("_bucket") and sample.labels.get("model") == LM and sample.labels.get("method") == "generate":
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            series.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
    assert series
    for buckets in series.values():
        buckets.sort(key=lambda b: b[0])
        assert buckets[-1][0] == float("inf")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert sum(b[-1][1] for b in series.values()) == total(families, "ray_steering_batch_size", "_count", model=LM, method="generate")
