"""Time to first token under open-loop arrivals, through gRPC (targets: TTFT p50 loaded / solo <= 2,
throughput >= 2x one at a time).

The demo LM (configs/demo.yaml's engine, limits and resources) is served by Ray Serve with the
gRPC proxy on loopback. ``--requests`` streamed GenerateStream requests, each with its own edit
set (8 latents clamped) and 4 to 64 new tokens (greedy), are sent

- one at a time: the solo time to first token (TTFT) and the one-at-a-time request rate;
- open loop: Poisson arrivals at ``--load`` (2) times that rate, each request sent at its arrival
  time whatever is still running, so requests arrive while others decode.

Offered 2x the one-at-a-time rate, the open loop can serve at most about 2x (the served rate
is the offered one less the tail after the last arrival, and 48 exponential gaps put the
window's length within about +-14% of its mean), so a third run offers ``--capacity-load`` (4)
times that rate to show what the engine sustains when arrivals outpace it.

Prints TTFT p50/p95 of the runs, their throughputs (requests/s), and as the last line
``ratio <TTFT p50 under load / TTFT p50 solo>``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support.serving import steered_requests, demo_lm_setup, machine, serving, add_topology_flag, topology  # noqa: E402


async def _stream(stub, request) -> tuple[float, float]:
    """(seconds to the first token, seconds to the end) of one GenerateStream call."""
    started = time.perf_counter()
    first = None
    async for message in stub.GenerateStream(request, timeout=300):
        if first is None and message.HasField("token"):
            first = time.perf_counter() - started
    return (first if first is not None else time.perf_counter() - started), time.perf_counter() - started


async def run(target: str, requests: list, gaps: list[float] | None) -> tuple[list[float], float]:
    """TTFTs and wall seconds: sequential when ``gaps`` is None, else open loop with those inter-arrival gaps."""
    import grpc
    from steering.v1 import steering_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)
        started = time.perf_counter()
        if gaps is None:
            outcomes = [await _stream(stub, r) for r in requests]
        else:
            tasks = []
            for request, gap in zip(requests, gaps):
                tasks.append(asyncio.ensure_future(_stream(stub, request)))
                await asyncio.sleep(gap)
            outcomes = await asyncio.gather(*tasks)
        return [o[0] for o in outcomes], time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--load", type=float, default=2.0, help="arrival rate as a multiple of the one-at-a-time rate")
    ap.add_argument("--capacity-load", type=float, default=4.0, help="the third run's arrival rate, the same way (0: skip)")
    add_topology_flag(ap)
    args = ap.parse_args()

    from services.client import Generation, SteeringClient

    rng = random.Random(0)
    with demo_lm_setup(separate_deployments=args.separate_deployments) as setup, serving(setup) as target:
        with SteeringClient(target, timeout=300) as client:
            requests = steered_requests(client, setup.model, args.requests, lambda i: Generation(max_new_tokens=rng.randint(4, 64), stop=()))
            client.generate_request(requests[0])  # warm-up
        solo_ttft, solo_s = asyncio.run(run(target, requests, None))
        rate = args.requests / solo_s
        gaps = [rng.expovariate(args.load * rate) for _ in requests]
        load_ttft, load_s = asyncio.run(run(target, requests, gaps))
        if args.capacity_load > 0:
            fast_gaps = [rng.expovariate(args.capacity_load * rate) for _ in requests]
            fast_ttft, fast_s = asyncio.run(run(target, requests, fast_gaps))

    p50 = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    p95 = lambda xs: statistics.quantiles(xs, n=20)[-1] * 1e3  # noqa: E731
    print(f"machine: {machine()}")
    print(f"model: {setup.what}; {topology(setup)}; {args.requests} streamed requests, 4-64 new tokens, own edits each")
    print(f"one at a time: {args.requests / solo_s:.2f} req/s, TTFT p50 {p50(solo_ttft):.1f} ms p95 {p95(solo_ttft):.1f} ms")
    print(f"open loop at {args.load:g}x that rate ({args.load * rate:.2f} req/s offered): {args.requests / load_s:.2f} req/s, "
          f"TTFT p50 {p50(load_ttft):.1f} ms p95 {p95(load_ttft):.1f} ms")
    if args.capacity_load > 0:
        print(f"open loop at {args.capacity_load:g}x ({args.capacity_load * rate:.2f} req/s offered): {args.requests / fast_s:.2f} req/s "
              f"({solo_s / fast_s:.2f}x one at a time), TTFT p50 {p50(fast_ttft):.1f} ms p95 {p95(fast_ttft):.1f} ms")
    print(f"throughput ratio {solo_s / load_s:.2f} (at {args.load:g}x offered)")
    print(f"ratio {p50(load_ttft) / p50(solo_ttft):.2f}")


if __name__ == "__main__":
    main()
