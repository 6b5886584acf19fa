"""Overhead of SAE steering on greedy generation (compare: SAELens HookedSAETransformer, 1.25x).

A 4-layer Llama-architecture causal LM (d_model 256, d_mlp 1024, vocab 2048, random weights, saved
and reloaded with from_pretrained) generates 64 tokens greedily from a 32-token prompt with a KV
cache. Cases, alternated within each repeat (median over repeats):

- unsteered: the plain model, no hooks;
- jumprelu clamp: a JumpReLU SAE (d_sae 4096) on blocks.2.hook_resid_post, 8 latents set to 5.0,
  error term kept (selective encode of the 8 latents only);
- topk clamp: the same with a TopK SAE (k 32), which needs a full encode;
- jumprelu clamp + readout: the clamp plus a top-10 latent readout on every token.

Each generation is timed twice: wall clock and this process's CPU time. By default torch runs
one thread, so CPU time measures the work done and is robust to other load on a shared machine;
the ratios (and the last line, ``ratio <jumprelu clamp / unsteered>``) use CPU time. Steered
cases include building the steering context (per-request cost).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec
from sae_runtime.saes import SaeConfig, build_sae
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext

SITE = "blocks.2.hook_resid_post"


def make_sae(architecture: str, seed: int) -> torch.nn.Module:
    cfg = SaeConfig(architecture, d_in=256, d_sae=4096, k=32 if architecture == "topk" else None)
    sae = build_sae(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(256, 4096, generator=g) / 16)
        sae.W_dec.copy_(torch.randn(4096, 256, generator=g) / 16)
        sae.b_enc.copy_(torch.randn(4096, generator=g) * 0.01)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, n_new: int, ctx: SteeringContext | None) -> torch.Tensor:
    """Greedy decoding with a KV cache; tells ``ctx`` (if any) the phase of each forward."""
    if ctx is not None:
        ctx.prefill()
    out = model(input_ids=prompt, use_cache=True)
    tokens = []
    for _ in range(n_new):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        if ctx is not None:
            ctx.decode()
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_causal_lm(
            tmp, "llama", seed=0, vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4,
            intermediate_size=1024, with_tokenizer=False,
        )
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    site = HookSite.parse(SITE)
    saes = {"jr": AttachedSae("jr", make_sae("jumprelu", 1), site), "tk": AttachedSae("tk", make_sae("topk", 2), site)}
    latents = tuple(range(100, 4096, 500))[:8]

    def clamp(name: str) -> InterventionPlan:
        plan = InterventionPlan((LatentEdit(name, EditOp.SET, latents, 5.0),))
        return plan.resolve({name: saes[name].sae})

    cases: dict[str, tuple[dict, list, ReadoutSpec | None] | None] = {
        "unsteered": None,
        "jumprelu clamp": ({"jr": saes["jr"]}, [clamp("jr")], None),
        "topk clamp": ({"tk": saes["tk"]}, [clamp("tk")], None),
        "jumprelu clamp + top-10 readout": ({"jr": saes["jr"]}, [clamp("jr")], ReadoutSpec(("jr",), top_k=10)),
    }
    prompt = torch.randint(5, 2048, (1, 32), generator=torch.Generator().manual_seed(3))

    def run(case) -> tuple[float, float, torch.Tensor]:
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        if case is None:
            toks = greedy(model, prompt, args.new_tokens, None)
        else:
            with SteeringContext(model, *case) as ctx:
                toks = greedy(model, prompt, args.new_tokens, ctx)
            if case[2] is not None:
                ctx.readouts()
        return time.perf_counter() - w0, time.process_time() - c0, toks

    for case in cases.values():  # warm-up
        run(case)
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    outputs: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats):
        order = list(cases.items())
        for name, case in order if rep % 2 == 0 else order[::-1]:  # alternate the order to cancel drift
            w, c, toks = run(case)
            wall[name].append(w)
            cpu[name].append(c)
            outputs[name] = toks

    med = {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in cases}
    base_wall, base_cpu = med["unsteered"]
    print(f"torch threads {torch.get_num_threads()}, prompt 32 tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats} alternated repeats")
    base_min = min(cpu["unsteered"])
    print(f"{'case':34s} {'wall ms':>8s} {'cpu ms':>8s} {'cpu ms/token':>12s} {'x wall':>7s} {'x cpu':>7s} {'x cpu(min)':>10s}")
    for name in cases:
        w, c = med[name]
        changed = "" if name == "unsteered" else f"  tokens changed: {not torch.equal(outputs[name], outputs['unsteered'])}"
        print(f"{name:34s} {w * 1e3:8.1f} {c * 1e3:8.1f} {c / args.new_tokens * 1e3:12.3f} "
              f"{w / base_wall:7.3f} {c / base_cpu:7.3f} {min(cpu[name]) / base_min:10.3f}{changed}")
    for name in list(cases)[2:]:
        print(f"ratio {name}: {med[name][1] / base_cpu:.3f}")
    print(f"ratio {med['jumprelu clamp'][1] / base_cpu:.3f}")


if __name__ == "__main__":
    main()
