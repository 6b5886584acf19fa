"""Statistics of a load-test run (:mod:`services.loadtest`): one :class:`Sample` per request,
throughput, latency percentiles of the successful requests, errors by gRPC status, per kind."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Sample:
    kind: str
    model: str
    status: str  # grpc.StatusCode name, or CLIENT_<ExceptionType>
    latency_s: float
    ttft_s: float | None = None  # streams: time to the first message
    tokens: int = 0
    batch_size: int = 0  # Timings.batch_size the service reported (0 = none)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ms = [s * 1e3 for s in seconds]
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "mean": sum(ms) / len(ms), "max": max(ms)}


def _counts(samples: Sequence[Sample]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for s in samples:
        if s.status != "OK":
            errors[s.status] = errors.get(s.status, 0) + 1
    ok = [s for s in samples if s.status == "OK"]
    return {"requests": len(samples), "ok": len(ok), "errors": dict(sorted(errors.items())),
            "latency_ms": latency_stats([s.latency_s for s in ok])}


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    """Throughput, latency percentiles of successful requests, errors by status, per kind."""
    summary = _counts(samples)
    ok = [s for s in samples if s.status == "OK"]
    wall = max(wall_s, 1e-9)
    batches = [s.batch_size for s in ok if s.batch_size]
    summary.update({
        "wall_s": wall_s,
        "throughput_rps": len(samples) / wall,
        "ok_rps": len(ok) / wall,
        "tokens_per_s": sum(s.tokens for s in ok) / wall,
        "ttft_ms": latency_stats([s.ttft_s for s in ok if s.ttft_s is not None]),
        "batch_size": {"mean": sum(batches) / len(batches) if batches else None, "max": max(batches, default=None)},
        "by_kind": {kind: _counts([s for s in samples if s.kind == kind]) for kind in sorted({s.kind for s in samples})},
    })
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    def ms(stats: dict) -> str:
        return "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in stats.items() if k in ("p50", "p95", "p99"))

    lines = [
        f"requests {summary['requests']}  ok {summary['ok']}  wall {summary['wall_s']:.2f} s  "
        f"throughput {summary['throughput_rps']:.2f} req/s  ({summary['ok_rps']:.2f} ok/s, {summary['tokens_per_s']:.1f} tokens/s)",
        f"latency ms  {ms(summary['latency_ms'])}",
    ]
    if summary["ttft_ms"]["p50"] is not None:
        lines.append(f"stream first message ms  {ms(summary['ttft_ms'])}")
    if summary["batch_size"]["mean"] is not None:
        lines.append(f"service batch size  mean {summary['batch_size']['mean']:.2f}  max {summary['batch_size']['max']}")
    for kind, stats in summary["by_kind"].items():
        lines.append(f"  {kind:10s} {stats['requests']:6d} req  {stats['ok']:6d} ok  {ms(stats['latency_ms'])}")
    errors = summary["errors"]
    lines.append("errors: " + (", ".join(f"{k} {v}" for k, v in errors.items()) if errors else "none"))
    return "\n".join(lines)


