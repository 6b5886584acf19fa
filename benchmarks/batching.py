"""Throughput of heterogeneous batching through the running service (target: >= 6x one at a time).

The demo LM (configs/demo.yaml's engine, limits and resources; a stand-in of its size until
models/demo-lm is built) is served by Ray Serve with the gRPC proxy on loopback. N requests, each
with its own edit set (8 latents clamped, sometimes 4 more scaled; different latents and values
per request), greedy, ``--new-tokens`` tokens (by default mixed lengths, 4 to 28 drawn per request
with a fixed seed, 16 on average, as the engine issue asks; ``--new-tokens 16`` gives every request
16), are sent

- one at a time (the next request leaves when the previous answer is back), and
- with ``--concurrency`` (16) in flight, so the replica's engine runs requests with different plans
  into one forward pass per step.

Both modes send the same requests; each is timed ``--repeats`` times, alternating, and the
median is kept. Prints both throughputs, the batch sizes the service reported, whether every
request got the same tokens in both modes, and as the last line
``ratio <concurrent throughput / one-at-a-time throughput>``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support.serving import steered_requests, DEMO_CONFIG, demo_lm_setup, machine, serving, add_topology_flag, topology  # noqa: E402


async def concurrent_aio(target: str, requests: list, concurrency: int) -> list:
    """Every request through one grpc.aio channel, at most ``concurrency`` in flight, in order."""
    import grpc
    from steering.v1 import steering_pb2_grpc

    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)

        async def one(request):
            async with limit:
                return await stub.Generate(request, timeout=300)

        return await asyncio.gather(*(one(r) for r in requests))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Enough requests that the drain at the end (the last long requests running with few rows
    # beside them) weighs little: with 64 mixed-length requests it cost about a tenth of the rate.
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", default="4-28",
                    help="new tokens per request: N, or LO-HI for lengths drawn uniformly (seeded) per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=0, help="override the config's resources.torch_threads")
    ap.add_argument("--max-running-rows", type=int, default=None, help="override the config's engine.max_running_rows")
    ap.add_argument("--client", choices=("aio", "threads"), default="aio", help="concurrent client: grpc.aio tasks or threads")
    add_topology_flag(ap)
    args = ap.parse_args()

    from services.client import Generation, SteeringClient

    overrides = {}
    if args.torch_threads:
        overrides["resources"] = {"num_cpus": 0.5, "torch_threads": args.torch_threads}
    if args.max_running_rows is not None:
        demo = yaml.safe_load(DEMO_CONFIG.read_text())
        engine = dict(next(m for m in demo["models"] if m["name"] == "demo-lm")["engine"])
        engine["max_running_rows"] = args.max_running_rows
        overrides["engine"] = engine
    with demo_lm_setup(separate_deployments=args.separate_deployments, **overrides) as setup, serving(setup) as target:
        with SteeringClient(target, timeout=300) as client:
            lo, _, hi = args.new_tokens.partition("-")
            rng = random.Random(0)
            lengths = [rng.randint(int(lo), int(hi or lo)) for _ in range(args.requests)]
            requests = steered_requests(client, setup.model, args.requests,
                                        lambda i: Generation(max_new_tokens=lengths[i], stop=()))

            def one_at_a_time():
                return [client.generate_request(r) for r in requests]

            def concurrent():
                if args.client == "threads":
                    with ThreadPoolExecutor(args.concurrency) as pool:
                        return list(pool.map(client.generate_request, requests))
                return asyncio.run(concurrent_aio(target, requests, args.concurrency))

            concurrent()  # warm-up: compile paths, fill caches
            one_at_a_time()
            times: dict[str, list[float]] = {"one at a time": [], "concurrent": []}
            outputs: dict[str, list] = {}
            for _ in range(args.repeats):
                for name, fn in (("one at a time", one_at_a_time), ("concurrent", concurrent)):
                    t0 = time.perf_counter()
                    outputs[name] = fn()
                    times[name].append(time.perf_counter() - t0)

    tokens = sum(len(r.completion.tokens) for r in outputs["concurrent"])
    same = sum(
        [t.id for t in a.completion.tokens] == [t.id for t in b.completion.tokens]
        for a, b in zip(outputs["one at a time"], outputs["concurrent"])
    )
    batch_sizes = [r.timings.batch_size for r in outputs["concurrent"]]
    print(f"machine: {machine()}")
    entry = setup.config["models"][0]
    print(f"model: {setup.what}; {topology(setup)}; replica resources {entry.get('resources')}, engine {entry.get('engine')}")
    print(f"requests {args.requests}, each with its own edit set; {args.new_tokens} new tokens each; "
          f"concurrency {args.concurrency} ({args.client} client); repeats {args.repeats} (median)")
    throughput = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        throughput[name] = args.requests / med
        print(f"{name:14s} {med:7.2f} s  {throughput[name]:6.2f} req/s  {tokens / med:7.1f} tokens/s")
    print(f"service batch size (concurrent): mean {statistics.mean(batch_sizes):.1f}, max {max(batch_sizes)}")
    print(f"same tokens in both modes: {same}/{args.requests} requests")
    print(f"ratio {throughput['concurrent'] / throughput['one at a time']:.2f}")


if __name__ == "__main__":
    main()
