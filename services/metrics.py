"""Service metrics, exported on Ray's Prometheus endpoint (names get a ``ray_`` prefix there).

Ray Serve adds ``deployment``, ``replica`` and ``application`` tags to each. Metrics are created
inside replicas (one set per process, on first use).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ray.serve import metrics

#: Latency buckets in milliseconds (1 ms to 2 min).
LATENCY_MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 120000]
BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]
RISK_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
LOAD_S_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


@dataclass(frozen=True)
class IngressMetrics:
    requests: metrics.Counter
    latency_ms: metrics.Histogram


@dataclass(frozen=True)
class ModelMetrics:
    queue_ms: metrics.Histogram
    compute_ms: metrics.Histogram
    batch_size: metrics.Histogram
    tokens: metrics.Counter
    steered: metrics.Counter
    risk: metrics.Histogram
    load_s: metrics.Histogram
    sae_load_s: metrics.Histogram
    running_rows: metrics.Gauge
    waiting: metrics.Gauge
    kv_tokens: metrics.Gauge
    step_ms: metrics.Histogram
    first_token_ms: metrics.Histogram
    inter_token_ms: metrics.Histogram


@functools.cache
def ingress_metrics() -> IngressMetrics:
    return IngressMetrics(
        requests=metrics.Counter(
            "steering_requests",
            description="Steering API requests by model, method and final gRPC status.",
            tag_keys=("model", "method", "status"),
        ),
        latency_ms=metrics.Histogram(
            "steering_request_latency_ms",
            description="End-to-end latency of Steering API requests at the ingress, in ms.",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("model", "method"),
        ),
    )


@functools.cache
def model_metrics() -> ModelMetrics:
    return ModelMetrics(
        queue_ms=metrics.Histogram(
            "steering_queue_ms",
            description="Time from arrival at the service to admission by the engine (or the start of an image batch), in ms.",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("model", "method"),
        ),
        compute_ms=metrics.Histogram(
            "steering_compute_ms",
            description="Time from admission by the engine to the request's end (image models: its batch's call), in ms.",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("model", "method"),
        ),
        batch_size=metrics.Histogram(
            "steering_batch_size",
            description="Rows running in the engine when a request was admitted (image models: requests per batch).",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=("model", "method"),
        ),
        tokens=metrics.Counter(
            "steering_tokens_generated",
            description="Tokens generated (steered outputs and unsteered twins).",
            tag_keys=("model",),
        ),
        steered=metrics.Counter(
            "steering_generations",
            description="Completed generation requests, steered (edits or risk mitigation) or not.",
            tag_keys=("model", "steered"),
        ),
        risk=metrics.Histogram(
            "steering_risk_score",
            description="Final hallucination-risk score of generated text.",
            boundaries=RISK_BUCKETS,
            tag_keys=("model",),
        ),
        load_s=metrics.Histogram(
            "steering_model_load_seconds",
            description="Time to build a backend (base model, SAEs, risk probe) in a replica, in s.",
            boundaries=LOAD_S_BUCKETS,
            tag_keys=("model",),
        ),
        sae_load_s=metrics.Histogram(
            "steering_sae_load_seconds",
            description="Time to load one SAE in a replica, in s.",
            boundaries=LOAD_S_BUCKETS,
            tag_keys=("model", "sae"),
        ),
        running_rows=metrics.Gauge("steering_engine_running_rows", description="Rows decoding in the engine after its last step.",
                                   tag_keys=("model",)),
        waiting=metrics.Gauge("steering_engine_waiting_requests", description="Requests waiting for admission after the engine's last step.",
                              tag_keys=("model",)),
        kv_tokens=metrics.Gauge("steering_engine_kv_tokens", description="KV-cache positions held (padding included) after the last step.",
                                tag_keys=("model",)),
        step_ms=metrics.Histogram("steering_engine_step_ms", description="Duration of one engine step (its prefill and decode forwards), in ms.",
                                  boundaries=LATENCY_MS_BUCKETS, tag_keys=("model",)),
        first_token_ms=metrics.Histogram("steering_time_to_first_token_ms", description="Submission to first generated token, in ms.",
                                         boundaries=LATENCY_MS_BUCKETS, tag_keys=("model",)),
        inter_token_ms=metrics.Histogram("steering_inter_token_latency_ms", description="Time between consecutive generated tokens, in ms.",
                                         boundaries=LATENCY_MS_BUCKETS, tag_keys=("model",)),
    )
