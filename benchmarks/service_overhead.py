"""What the service adds to one request: a one-token Generate through gRPC vs the same call
in-process, against the bare Ray Serve round trip of the same run (target: added <= 1.3x it).

The demo LM (configs/demo.yaml's settings; a stand-in of its size until models/demo-lm is built)
is served by Ray Serve with the gRPC proxy on loopback, and also loaded in this process from the
same spec. One steered request (8 latents clamped, greedy, 1 new token) is sent ``--requests``
times down each path, the paths taking turns request by request (``--block 1``, the default), so
every timed call follows calls of the other paths, as a served request follows the proxy's and
the client's work. Timed in blocks of 20 instead (``--block 20``), the in-process path runs in a
hot loop of its own that no served request gets: on 2 cores its compute then reads about 0.3 ms
faster than the same call's after other work, and that difference is counted as the service's
overhead. The paths:

- grpc: client -> gRPC proxy -> ingress deployment -> the model (validation, the engine's
  thread) and back; the model is served inside the ingress replica when the config colocates
  models (``ingress.colocate_models``, as configs/demo.yaml does), else in its own deployment
  (one more hop);
- in-process: the model deployment's own steps without Ray: proto -> request spec, validate,
  ``backend.generate([request])`` (the same engine, stepped in this thread), result -> proto.

Two calls with no model compute show where the time goes: ListModels (proxy -> ingress, answered
from the ingress' cache) and SearchFeatures (proxy -> ingress -> the model, a label scan).

The last line is ``ratio <(p50 grpc - p50 in-process) / p50 ListModels>``: what the service adds
to a request, in units of Ray Serve's own round trip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support.serving import demo_lm_setup, machine, serving, add_topology_flag, topology  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--block", type=int, default=1, help="requests per path before switching (module doc)")
    add_topology_flag(ap)
    args = ap.parse_args()

    import torch

    from services import convert
    from sae_runtime.backends.registry import build_backend
    from services.client import Generation, SteeringClient, edit
    from services.config import parse_config

    with demo_lm_setup(separate_deployments=args.separate_deployments) as setup:
        model = parse_config(setup.config).models[0]
        if model.resources.torch_threads:
            torch.set_num_threads(model.resources.torch_threads)
        backend = build_backend(model.to_spec(setup.base_dir))
        sae = backend.info().saes[0]
        sae_names = tuple(s.name for s in backend.info().saes)

        def message(name: str):
            return SteeringClient.text_request(
                name, "the dog is", seed=0, edits=[edit(sae.name, "set", *range(0, 8 * 37, 37), value=5.0)],
                generation=Generation(max_new_tokens=1),
            )

        def in_process() -> None:
            request = backend.validate(convert.text_request_from_proto(message(setup.model), sae_names, model.limits.max_new_tokens))
            (result,) = backend.generate([request])
            convert.text_result_to_proto(result, timings=convert.pb.Timings(), versions=convert.pb.Versions(), steered=True)

        colocated = parse_config(setup.config).ingress.colocate_models
        with serving(setup) as target, SteeringClient(target, timeout=60) as client:
            paths = {"grpc": lambda: client.generate_request(message(setup.model))}
            paths |= {
                "in-process": in_process,
                "ListModels (hops: proxy, ingress)": client.list_models,
                f"SearchFeatures ({'model in the ingress' if colocated else '+ model hop'})": lambda: client.search_features(setup.model, "", limit=1),
            }
            for fn in paths.values():  # warm-up
                for _ in range(5):
                    fn()
            latencies: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(max(1, args.requests // args.block)):
                for name, fn in paths.items():
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        fn()
                        latencies[name].append(time.perf_counter() - t0)

    p50 = {name: statistics.median(ts) * 1e3 for name, ts in latencies.items()}
    base = p50["in-process"]
    print(f"machine: {machine()}")
    print(f"model: {setup.what}; {topology(setup)}")
    print(f"one steered request (8 latents clamped), 1 new token, {len(latencies['in-process'])} per path, sequential, "
          f"paths in turn every {args.block} request(s)")
    for name, ms in p50.items():
        p95 = statistics.quantiles(latencies[name], n=20)[-1] * 1e3
        extra = f"  (+{ms - base:.2f} ms over in-process)" if name == "grpc" else ""
        print(f"{name:34s} p50 {ms:7.2f} ms  p95 {p95:7.2f} ms{extra}")
    added, trip = p50["grpc"] - base, p50["ListModels (hops: proxy, ingress)"]
    print(f"added p50: {added:.2f} ms; bare Ray Serve round trip (ListModels) p50: {trip:.2f} ms")
    print(f"ratio {added / trip:.2f}")


if __name__ == "__main__":
    main()
