"""Cost of per-row plans in one batch, in-process through the engine (target: <= 1.05).

The demo LM (configs/demo.yaml's model, loaded with ``CausalLmBackend.from_spec`` with its SAE and
risk probe; a stand-in of its size until models/demo-lm is built) serves ``--batch`` requests
(different prompts, greedy, ``--new-tokens`` tokens) submitted together in one
``backend.generate`` call: the engine admits them into one running batch, each row's plan
compiled into its slot of the plan table. Twice per repeat, in alternating order:

- shared: every row carries the same edit set (8 latents clamped, 4 scaled);
- heterogeneous: every row carries its own edit set of the same shape (other latents, values);
- mixed: every row its own edit set, rows cycling through four kinds: plain (as heterogeneous),
  conditional (the clamp applied only where another latent of the SAE is above a threshold),
  projection (4 of the clamps are ``project_set`` on the latents' decoder directions) and vector
  (plus an inline steering vector added at the SAE's site).

Different edits can make rows stop at EOS at different steps, which would compare different
amounts of work; so the benchmark's engine ignores EOS and every row generates exactly
``--new-tokens`` tokens in every case (checked). Times are this process's CPU time (torch
``--threads`` threads, default 1, so CPU time measures the work and is robust to other load on a
shared machine), wall clock beside it. Prints the median of each case (and, for scale, the
unsteered batch and one row alone), the ratios of each case's fastest repeat (the least
disturbed on a noisy machine), and as the last line ``ratio <heterogeneous / shared>`` (CPU;
target <= 1.05), or with ``--mixed`` ``ratio <mixed / shared>`` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support.engine_lm import demo_lm_spec  # noqa: E402
from _support.serving import PROMPTS, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--mixed", action="store_true", help="end with mixed / shared instead of heterogeneous / shared")
    args = ap.parse_args()

    import torch

    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.types import SamplingParams, TextRequest
    from sae_runtime.plan import Compare, Condition, EditOp, InterventionPlan, LatentEdit, VectorEdit

    if args.threads:
        torch.set_num_threads(args.threads)
    with demo_lm_spec() as (spec, what):
        backend = CausalLmBackend.from_spec(spec)
    backend.engine.eos_ids = frozenset()  # equal work in every case: no row stops early
    sae = backend.info().saes[0]
    rng = random.Random(0)

    def edit_set() -> InterventionPlan:
        clamp = LatentEdit(sae.name, EditOp.SET, tuple(rng.sample(range(sae.d_sae), 8)), round(rng.uniform(2, 8), 3))
        scale = LatentEdit(sae.name, EditOp.SCALE, tuple(rng.sample(range(sae.d_sae), 4)), round(rng.uniform(0, 2), 3))
        return InterventionPlan((clamp, scale))

    def mixed_set(kind: int) -> InterventionPlan:
        plan = edit_set()
        clamp, scale = plan.edits
        if kind == 1:  # conditional: the clamp only where another latent fires
            when = Condition(sae.name, rng.randrange(sae.d_sae), compare=Compare.ABOVE, threshold=round(rng.uniform(0, 1), 3))
            return InterventionPlan((LatentEdit(sae.name, EditOp.SET, clamp.latents, clamp.value, condition=when), scale))
        if kind == 2:  # projection: half the clamps set the component along the latent's decoder direction
            project = LatentEdit(sae.name, EditOp.PROJECT_SET, clamp.latents[:4], clamp.value)
            return InterventionPlan((LatentEdit(sae.name, EditOp.SET, clamp.latents[4:], clamp.value), project, scale))
        if kind == 3:  # a steering vector at the SAE's site beside the latent edits
            values = tuple(round(rng.gauss(0, 1), 4) for _ in range(sae.d_in))
            return InterventionPlan(plan.edits, vectors=(VectorEdit(values=values, site=sae.hook_name, value=0.5),))
        return plan

    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    shared_plan = edit_set()
    batches = {
        "shared": [TextRequest(prompt=p, plan=shared_plan, sampling=sampling) for p in prompts],
        "heterogeneous": [TextRequest(prompt=p, plan=edit_set(), sampling=sampling) for p in prompts],
        "mixed": [TextRequest(prompt=p, plan=mixed_set(j % 4), sampling=sampling) for j, p in enumerate(prompts)],
        "unsteered": [TextRequest(prompt=p, sampling=sampling) for p in prompts],
        "one row": [TextRequest(prompt=prompts[0], plan=shared_plan, sampling=sampling)],
    }
    for rows in batches.values():  # warm-up
        backend.generate(rows)
    wall: dict[str, list[float]] = {name: [] for name in batches}
    cpu: dict[str, list[float]] = {name: [] for name in batches}
    tokens: dict[str, int] = {}
    batch_sizes: dict[str, int] = {}
    for repeat in range(args.repeats):
        order = list(batches) if repeat % 2 == 0 else list(reversed(batches))
        for name in order:
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            results = backend.generate(batches[name])  # validation, admission, steps, results
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
            tokens[name] = sum(len(r.steered.tokens) for r in results)
            batch_sizes[name] = max(r.timings.batch_size for r in results)
            assert tokens[name] == args.new_tokens * len(batches[name]), (name, tokens[name])

    print(f"machine: {machine()}")
    print(f"model: {what}")
    print(f"production path: CausalLmBackend.from_spec + backend.generate({args.batch} TextRequests) on the engine")
    print(f"batch {args.batch} rows, {args.new_tokens} new tokens, greedy; repeats {args.repeats} (median), alternating order")
    for name in batches:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:14s} cpu {c * 1e3:8.1f} ms  wall {w * 1e3:8.1f} ms  {len(batches[name]):3d} rows "
              f"(running together: {batch_sizes[name]:2d})  {tokens[name]:4d} tokens  {c * 1e3 / tokens[name]:6.3f} cpu ms/token")
    shared = statistics.median(cpu["shared"])
    mixed, heterogeneous = statistics.median(cpu["mixed"]) / shared, statistics.median(cpu["heterogeneous"]) / shared
    best = {name: min(v) for name, v in cpu.items()}
    print(f"fastest repeat: mixed / shared {best['mixed'] / best['shared']:.3f}, heterogeneous / shared "
          f"{best['heterogeneous'] / best['shared']:.3f} (the least disturbed runs, beside the medians below)")
    print(f"mixed / shared {mixed:.3f} (target <= 1.10); heterogeneous / shared {heterogeneous:.3f} (target <= 1.05)")
    print(f"ratio {mixed if args.mixed else heterogeneous:.3f}")


if __name__ == "__main__":
    main()
