"""Cost of per-row plans in one batch, in-process on the backend (target: <= 1.10).

The demo LM's backend (built from configs/demo.yaml's spec; a stand-in of its size until
models/demo-lm is built) generates one batch of ``--batch`` rows (different prompts, greedy,
``--new-tokens`` tokens) twice per repeat, in alternating order:

- shared: every row carries the same edit set (8 latents clamped, 4 scaled);
- heterogeneous: every row carries its own edit set of the same shape (other latents, values).

Different edits can make rows stop at EOS at different steps, which would compare different
amounts of work; so the benchmark's backend ignores EOS (``backend.eos_ids`` emptied) and every
row generates exactly ``--new-tokens`` tokens in every case (checked). Prints the median batch
time of each case (and, for scale, the unsteered batch and one row alone) and as the last line
``ratio <heterogeneous / shared>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support.serving import PROMPTS, demo_lm_setup, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the config's torch_threads, else torch's default)")
    args = ap.parse_args()

    import random

    import torch

    from sae_runtime.backends.types import SamplingParams, TextRequest
    from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit
    from sae_runtime.backends.registry import build_backend
    from services.config import parse_config

    with demo_lm_setup() as setup:
        model = parse_config(setup.config).models[0]
        threads = args.threads or model.resources.torch_threads
        if threads:
            torch.set_num_threads(threads)
        backend = build_backend(model.to_spec(setup.base_dir))
        backend.eos_ids = frozenset()  # equal work in every case: no row stops early
        sae = backend.info().saes[0]
        rng = random.Random(0)

        def edit_set() -> InterventionPlan:
            clamp = LatentEdit(sae.name, EditOp.SET, tuple(rng.sample(range(sae.d_sae), 8)), round(rng.uniform(2, 8), 3))
            scale = LatentEdit(sae.name, EditOp.SCALE, tuple(rng.sample(range(sae.d_sae), 4)), round(rng.uniform(0, 2), 3))
            return InterventionPlan((clamp, scale))

        sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
        shared_plan = edit_set()
        batches = {
            "shared": [TextRequest(prompt=p, plan=shared_plan, sampling=sampling) for p in prompts],
            "heterogeneous": [TextRequest(prompt=p, plan=edit_set(), sampling=sampling) for p in prompts],
            "unsteered": [TextRequest(prompt=p, sampling=sampling) for p in prompts],
            "one row": [TextRequest(prompt=prompts[0], plan=shared_plan, sampling=sampling)],
        }
        batches = {name: [backend.validate(r) for r in rows] for name, rows in batches.items()}
        for rows in batches.values():  # warm-up
            backend.generate(rows)
        times: dict[str, list[float]] = {name: [] for name in batches}
        tokens: dict[str, int] = {}
        for repeat in range(args.repeats):
            order = list(batches) if repeat % 2 == 0 else list(reversed(batches))
            for name in order:
                t0 = time.perf_counter()
                results = backend.generate(batches[name])
                times[name].append(time.perf_counter() - t0)
                tokens[name] = sum(len(r.steered.tokens) for r in results)
                assert tokens[name] == args.new_tokens * len(batches[name]), (name, tokens[name])

    print(f"machine: {machine()}")
    print(f"model: {setup.what}")
    print(f"batch {args.batch} rows, {args.new_tokens} new tokens, greedy; repeats {args.repeats} (median), alternating order")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:14s} {med * 1e3:8.1f} ms  {len(batches[name]):3d} rows  {tokens[name]:4d} tokens  "
              f"{med * 1e3 / tokens[name]:6.3f} ms/token")
    print(f"ratio {statistics.median(times['heterogeneous']) / statistics.median(times['shared']):.3f}")


if __name__ == "__main__":
    main()
