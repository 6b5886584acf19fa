"""Bounded load and soak run of the service on loopback: ``python -m services.soak``.

    python -m services.soak                                   # tiny random models built in a temp dir
    python -m services.soak --config configs/demo.yaml --duration 120 --report reports/soak.json

Starts its own Ray (a fresh local cluster) and Serve with the gRPC proxy on a free 127.0.0.1 port,
serving ``--config`` (default: tiny random LM, LLaVA and SDXL-Turbo models with SAEs, built in a
temp dir), then runs four phases with the load-test tool's request mix (``services.loadtest``):

1. warm-up (``--warmup`` s, not counted);
2. ramp: ``--ramp`` concurrency levels, ``--ramp-step`` s each; the soak runs at the highest level
   whose p99 stays within 80% of ``--p99-bound-ms`` with no errors (the most this machine holds);
3. soak: ``--duration`` s at that concurrency; replica memory (RSS of every Serve replica and
   proxy process, from /proc) sampled at the start, every few seconds and at the end;
4. deadlines: ``--doomed`` requests with a deadline (``--doomed-deadline-ms``) shorter than one
   batch of the live load but longer than the trip to the replica, fired into live load; they must
   end DEADLINE_EXCEEDED (or OK within it: a tiny model may stop at EOS at once), the proxy must
   count the late ones CANCELLED, live requests must all succeed, and a fresh request must be
   served promptly afterwards. How many live batches also held doomed rows is reported, not
   judged: batches form the moment the replica is free, so a doomed request that arrives then
   joins one while it is still alive (and, once in, its row runs to the end of the batch); that a
   request cancelled while it waits never takes a slot is checked by tests/services/test_batching.py.

Pass criteria (exit status 1 otherwise): no error status in the soak, soak p99 within the bound,
RSS growth of every process within ``--max-rss-growth`` (fraction of its start RSS, after warm-up),
and the deadline checks. Bounded: at most 30 minutes of load in all; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from steering.v1 import steering_pb2_grpc

from services import loadtest
from services.loadtest_stats import Sample, percentile, summarize

MAX_TOTAL_S = 1800.0
RSS_SAMPLE_S = 5.0


# -- the service -------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_models(root: Path) -> Path:
    """Tiny random LM (+ labelled SAE, risk probe), LLaVA (+ vision SAE) and SDXL-Turbo (+ U-Net SAE)
    saved under ``root`` as users ship them, and a config serving them; returns the config path."""
    import yaml

    from sae_runtime.demo.tiny_models import build_tiny_causal_lm, build_tiny_llava
    from sae_runtime.demo.tiny_saes import random_probe, random_sae
    from sae_runtime.demo.tiny_sdxl import save_tiny_sdxl
    from sae_runtime.formats import save_native

    def saved_sae(d_in: int, d_sae: int, hook: str, labels: dict[str, int], seed: int) -> Path:
        return save_native(random_sae(d_in, d_sae, hook, seed=seed, labels=labels), root / "saes" / hook.replace(".", "_"))

    build_tiny_causal_lm(root / "lm", "llama", seed=0, hidden_size=32, num_layers=2, init_std=0.1)
    lm_labels = {"color:red": 3, "color:blue": 5, "animal:cat": 9}
    lm_sae = saved_sae(32, 64, "blocks.0.hook_resid_post", lm_labels, seed=1)
    random_probe("res", 64, seed=2, labels=lm_labels).save(root / "risk")
    build_tiny_llava(root / "llava", seed=0)
    vis_sae = saved_sae(32, 64, "vision.layers.1", {"shape:round": 2}, seed=4)
    save_tiny_sdxl(root / "sdxl", seed=0)
    img_sae = saved_sae(64, 128, "unet.mid_block.attentions.0", {"texture:fur": 7}, seed=3)
    small = {"num_cpus": 0.1, "torch_threads": 1}
    config = {
        "grpc": {"port": 9000, "request_timeout_s": 120},
        "ingress": {"num_cpus": 0.1},
        "models": [
            {"name": "tiny-lm", "kind": "causal_lm", "path": "lm", "saes": [{"name": "res", "path": str(lm_sae)}], "risk_probe": "risk",
             "limits": {"max_new_tokens": 32, "max_batch_size": 16}, "engine": {"max_running_rows": 16},
             "resources": small, "max_ongoing_requests": 64},
            {"name": "tiny-llava", "kind": "llava", "path": "llava", "saes": [{"name": "vis", "path": str(vis_sae)}],
             "limits": {"max_new_tokens": 32, "max_batch_size": 8}, "engine": {"max_running_rows": 8},
             "resources": small, "max_ongoing_requests": 32},
            {"name": "tiny-sdxl", "kind": "sdxl_turbo", "path": "sdxl", "saes": [{"name": "mid", "path": str(img_sae)}],
             "limits": {"max_inference_steps": 2, "max_batch_size": 4}, "engine": {"max_running_rows": 4},
             "resources": small, "max_ongoing_requests": 16},
        ],
    }
    path = root / "service.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_service(config_path: Path) -> tuple[str, str]:
    """Fresh local Ray + Serve serving ``config_path`` on free loopback ports; (gRPC target, metrics URL)."""
    import ray
    from ray import serve

    from services.app import build_application, check_local_paths, controller_options, export_ray_env, grpc_options
    from services.config import load_config

    config = load_config(config_path)
    base_dir = config_path.resolve().parent
    check_local_paths(config, base_dir)
    config = config.model_copy(update={"grpc": config.grpc.model_copy(update={"port": free_port()})})
    metrics_port = free_port()
    export_ray_env(config)
    ray.init(address="local", include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False,
             configure_logging=False)
    serve.start(grpc_options=grpc_options(config), http_options={"host": "127.0.0.1", "port": free_port()},
                controller_options=controller_options(config))
    serve.run(build_application(config, base_dir), name=config.app_name, route_prefix="/", blocking=False)
    return f"127.0.0.1:{config.grpc.port}", f"http://127.0.0.1:{metrics_port}/metrics"


def stop_service() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# -- memory ------------------------------------------------------------------------------------------
def serve_processes() -> dict[str, int]:
    """Serve replica and proxy actor name -> worker PID (asked of each actor)."""
    import ray

    pids = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith(("SERVE_REPLICA::", "SERVE_PROXY_ACTOR")):
            actor = ray.get_actor(name, namespace=entry["namespace"])
            label = name.removeprefix("SERVE_REPLICA::") if name.startswith("SERVE_REPLICA") else "proxy"
            pids[label] = int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30))
    return pids


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- phases ------------------------------------------------------------------------------------------
async def timed_load(target: str, factory: loadtest.RequestFactory, concurrency: int, seconds: float, deadline_s: float,
                     rss: dict[str, list] | None = None, pids: dict[str, int] | None = None) -> tuple[list[Sample], float]:
    """``loadtest.run_load`` for ``seconds``, sampling the RSS of ``pids`` every few seconds meanwhile."""
    async def sampler() -> None:
        while True:
            await asyncio.sleep(RSS_SAMPLE_S)
            for label, pid in (pids or {}).items():
                rss[label].append(rss_mib(pid))

    task = asyncio.ensure_future(sampler()) if rss is not None else None
    try:
        return await loadtest.run_load(target, factory, concurrency=concurrency, requests=loadtest.MAX_REQUESTS,
                                       duration_s=seconds, deadline_s=deadline_s)
    finally:
        if task is not None:
            task.cancel()


async def deadline_phase(target: str, model: str, live: int, doomed: int, doomed_deadline_s: float, seconds: float) -> dict[str, Any]:
    """``live`` clients with long generations keep the LM's batches busy while ``doomed`` requests
    with a deadline far shorter than one batch arrive in bursts. Returns what each side saw."""
    from services.client import Generation, SteeringClient, edit

    live_samples: list[Sample] = []
    doomed_samples: list[Sample] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)
        stop_at = time.perf_counter() + seconds
        rng = random.Random(7)

        def request(max_new_tokens: int):
            return SteeringClient.text_request(model, "the red cat", edits=[edit(model_sae, "set", rng.randrange(8), value=4.0)],
                                               generation=Generation(max_new_tokens=max_new_tokens), seed=rng.randrange(1000))

        models = await loadtest.list_models(target, None)
        model_sae = next(m for m in models if m.name == model).saes[0].name

        async def live_client() -> None:
            while time.perf_counter() < stop_at:
                live_samples.append(await loadtest.send(stub, "steered", model, request(32), 60.0, ()))

        async def doomed_bursts() -> None:
            await asyncio.sleep(1.0)
            for _ in range(doomed // 10):
                burst = [loadtest.send(stub, "doomed", model, request(32), doomed_deadline_s, ()) for _ in range(10)]
                doomed_samples.extend(await asyncio.gather(*burst))
                await asyncio.sleep(max(0.0, seconds - 2.0) / max(doomed // 10, 1))

        await asyncio.gather(*(live_client() for _ in range(live)), doomed_bursts())
        probe_started = time.perf_counter()
        probe = await stub.Generate(request(2), timeout=30)
        probe_s = time.perf_counter() - probe_started
    doomed_status: dict[str, int] = {}
    for s in doomed_samples:
        doomed_status[s.status] = doomed_status.get(s.status, 0) + 1
    live_ok = [s for s in live_samples if s.status == "OK"]
    batches = [s.batch_size for s in live_ok]
    return {
        "live_clients": live, "doomed": len(doomed_samples), "doomed_deadline_ms": doomed_deadline_s * 1e3,
        "doomed_status": doomed_status,
        "doomed_ok_max_ms": max((s.latency_s * 1e3 for s in doomed_samples if s.status == "OK"), default=None),
        "live_requests": len(live_samples), "live_ok": len(live_ok),
        "live_batch_size_max": max(batches, default=0),
        "live_batches_larger_than_live_clients": sum(b > live for b in batches),
        "live_p99_ms": percentile([s.latency_s * 1e3 for s in live_ok], 99),
        "probe_after_ms": probe_s * 1e3, "probe_queue_ms": probe.timings.queue_ms, "probe_batch_size": probe.timings.batch_size,
    }


def cancelled_count(metrics_url: str) -> float:
    """gRPC requests the proxy ended CANCELLED (Ray's Prometheus export of serve_num_grpc_requests):
    those whose deadline passed while they were being served; each one's replica work is cancelled
    with it (a request waiting for a batch leaves the queue)."""
    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_serve_num_grpc_requests_total{") and 'status_code="CANCELLED"' in line)


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="service config to serve (default: tiny random models in a temp dir)")
    p.add_argument("--duration", type=float, default=90.0, help="soak seconds (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--ramp", default="8,16,32,64", help="concurrency levels to try (default: %(default)s)")
    p.add_argument("--ramp-step", type=float, default=8.0, help="seconds per ramp level")
    p.add_argument("--p99-bound-ms", type=float, default=2500.0, help="p99 latency bound of the soak (default: %(default)s)")
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth per process, fraction of start")
    p.add_argument("--mix", default=None, help=f"request mix as in services.loadtest (default: {loadtest.DEFAULT_MIX})")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--deadline", type=float, default=30.0, help="gRPC deadline of load requests, seconds")
    p.add_argument("--doomed", type=int, default=200, help="requests with a too-short deadline in the deadline phase")
    p.add_argument("--doomed-deadline-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default="reports/soak.json")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.ramp.split(",") if x.strip()]
    total = args.warmup + args.ramp_step * len(levels) + args.duration + 15
    if not levels or not all(1 <= c <= loadtest.MAX_CONCURRENCY for c in levels):
        p.error(f"--ramp: concurrency levels in [1, {loadtest.MAX_CONCURRENCY}]")
    if min(args.duration, args.ramp_step) <= 0 or args.warmup < 0 or total > MAX_TOTAL_S:
        p.error(f"phases must be positive and last at most {MAX_TOTAL_S:.0f} s in all")
    args.levels = levels
    return args


def run(args: argparse.Namespace, config_path: Path) -> dict[str, Any]:
    target, metrics_url = start_service(config_path)
    models = asyncio.run(loadtest.list_models(target, None))
    mix, dropped = loadtest.plan_mix(models, args.mix)

    def factory(seed: int) -> loadtest.RequestFactory:
        return loadtest.RequestFactory(models, mix, seed=seed, max_new_tokens=args.max_new_tokens)

    print(f"serving {', '.join(m.name for m in models)} on {target}; mix {mix}", flush=True)
    asyncio.run(timed_load(target, factory(args.seed), max(args.levels), args.warmup, args.deadline))
    ramp = []
    for n, level in enumerate(args.levels):
        samples, wall = asyncio.run(timed_load(target, factory(args.seed + 1 + n), level, args.ramp_step, args.deadline))
        s = summarize(samples, wall)
        ramp.append({"concurrency": level, "rps": s["ok_rps"], "p50_ms": s["latency_ms"]["p50"], "p99_ms": s["latency_ms"]["p99"],
                     "errors": s["errors"]})
        print(f"ramp c={level:4d}: {s['ok_rps']:7.1f} ok/s  p50 {s['latency_ms']['p50']:8.1f} ms  p99 {s['latency_ms']['p99']:8.1f} ms  "
              f"errors {s['errors'] or 'none'}", flush=True)
    # The soak runs at the highest level that held the bound with 20% headroom (a short step's p99 is noisy).
    holding = [r for r in ramp if not r["errors"] and r["p99_ms"] is not None and r["p99_ms"] <= 0.8 * args.p99_bound_ms]
    concurrency = max((r["concurrency"] for r in holding), default=min(args.levels))

    pids = serve_processes()
    rss: dict[str, list] = {label: [rss_mib(pid)] for label, pid in pids.items()}
    samples, wall = asyncio.run(timed_load(target, factory(args.seed + 100), concurrency, args.duration, args.deadline, rss, pids))
    for label, pid in pids.items():
        rss[label].append(rss_mib(pid))
    soak = summarize(samples, wall)
    restarted = sorted(label for label, pid in serve_processes().items() if pids.get(label) != pid)

    lm = next((m.name for m in models if m.kind == "causal_lm"), None)
    deadline: dict[str, Any] | None = None
    if lm is not None and args.doomed > 0:
        before = cancelled_count(metrics_url)
        deadline = asyncio.run(deadline_phase(target, lm, live=4, doomed=args.doomed, doomed_deadline_s=args.doomed_deadline_ms / 1e3,
                                              seconds=10.0))
        after = before
        for _ in range(30):  # Ray exports metrics every few seconds
            after = cancelled_count(metrics_url)
            if after - before >= deadline["doomed_status"].get("DEADLINE_EXCEEDED", 0) * 0.9:
                break
            time.sleep(1.0)
        deadline["proxy_counted_cancelled"] = after - before
    return {"tool": "services.soak", "target": target, "models": [m.name for m in models], "mix": mix, "dropped_kinds": dropped,
            "ramp": ramp, "soak_concurrency": concurrency, "soak": {k: v for k, v in soak.items() if k != "by_kind"},
            "soak_by_kind": soak["by_kind"], "rss_mib": rss, "restarted": restarted, "deadline_phase": deadline,
            "settings": {k: v for k, v in vars(args).items() if k != "levels"}, "samples": [asdict(s) for s in samples]}


def verdict(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The failed pass criteria, as sentences (empty = pass)."""
    failures = []
    soak = report["soak"]
    if soak["errors"]:
        failures.append(f"soak errors: {soak['errors']}")
    if soak["latency_ms"]["p99"] is None or soak["latency_ms"]["p99"] > args.p99_bound_ms:
        failures.append(f"soak p99 {soak['latency_ms']['p99']} ms over the bound {args.p99_bound_ms} ms")
    for label, series in report["rss_mib"].items():
        start, end = series[0], series[-1]
        if start is None or end is None or end > start * (1 + args.max_rss_growth):
            failures.append(f"RSS of {label}: {start} -> {end} MiB (over +{args.max_rss_growth:.0%})")
    if report["restarted"]:
        failures.append(f"processes restarted during the soak: {report['restarted']}")
    d = report["deadline_phase"]
    if d is not None:
        late = d["doomed_status"].get("DEADLINE_EXCEEDED", 0)
        if set(d["doomed_status"]) - {"OK", "DEADLINE_EXCEEDED"} or late < 0.5 * d["doomed"]:
            failures.append(f"doomed requests ended {d['doomed_status']}: expected DEADLINE_EXCEEDED (or OK in time)")
        if d["doomed_ok_max_ms"] is not None and d["doomed_ok_max_ms"] > d["doomed_deadline_ms"] * 1.5:
            failures.append(f"a doomed request succeeded after {d['doomed_ok_max_ms']:.0f} ms, past its deadline")
        if d["proxy_counted_cancelled"] < late * 0.9:
            failures.append(f"the proxy counted {d['proxy_counted_cancelled']:.0f} of {late} late requests CANCELLED")
        if d["live_ok"] != d["live_requests"] or d["probe_queue_ms"] > 250:
            failures.append(f"live requests failed or the queue did not drain (probe queue {d['probe_queue_ms']:.0f} ms)")
    return failures


def print_report(report: dict[str, Any], failures: list[str]) -> None:
    soak, lat = report["soak"], report["soak"]["latency_ms"]
    print(f"\nsoak: {soak['wall_s']:.0f} s at concurrency {report['soak_concurrency']}: {soak['requests']} requests, "
          f"{soak['ok_rps']:.1f} ok/s, {soak['tokens_per_s']:.0f} tokens/s; latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, "
          f"p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms; errors {soak['errors'] or 'none'}")
    for label, series in report["rss_mib"].items():
        values = [v for v in series if v is not None]
        print(f"  RSS {label:40s} start {series[0]:7.1f} MiB  end {series[-1]:7.1f} MiB  max {max(values):7.1f} MiB")
    d = report["deadline_phase"]
    if d:
        print(f"deadlines: {d['doomed']} requests with a {d['doomed_deadline_ms']:.0f} ms deadline -> {d['doomed_status']}; service counted "
              f"{d['proxy_counted_cancelled']:.0f} CANCELLED; {d['live_ok']}/{d['live_requests']} live requests OK, their batches "
              f"<= {d['live_batch_size_max']} (live clients {d['live_clients']}); probe after: {d['probe_after_ms']:.0f} ms, "
              f"queue {d['probe_queue_ms']:.1f} ms")
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user cluster
    with tempfile.TemporaryDirectory(prefix="soak-models-") as tmp:
        config_path = Path(args.config) if args.config else build_tiny_models(Path(tmp))
        try:
            report = run(args, config_path)
        finally:
            stop_service()
    failures = verdict(report, args)
    report["failures"] = failures
    print_report(report, failures)
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
