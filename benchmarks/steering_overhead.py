"""Overhead of SAE steering on greedy generation through the production API (target: <= 1.03).

A 4-layer Llama-architecture causal LM (d_model 256, d_mlp 1024, vocabulary 2048, random
weights) is saved and served by a :class:`~sae_runtime.backends.causal_lm.CausalLmBackend` built
with ``from_spec`` (``from_pretrained`` of the model, the SAEs loaded from their files). Every
case is one ``backend.generate([TextRequest(...)])`` call (validation, the engine's admission,
prefill and 64 decode steps, result assembly): a 32-token prompt, 64 greedy new tokens. Cases,
alternated within each repeat (median over repeats):

- unsteered: the same request with an empty plan, through the same engine;
- jumprelu clamp: a JumpReLU SAE (d_sae 4096, stored as a SAELens directory) on
  blocks.2.hook_resid_post, 8 latents set to 5.0, error term kept;
- topk clamp: the same with a TopK SAE (k 32), which needs a full encode;
- jumprelu clamp + top-10 readout: the clamp plus a top-10 latent readout on every token.

Each generation is timed twice: wall clock and this process's CPU time. By default torch runs
one thread, so CPU time measures the work done and is robust to other load on a shared machine;
the ratios (and the last line, ``ratio <jumprelu clamp / unsteered>``) use CPU time. The engine
ignores EOS here so that every case generates exactly 64 tokens (checked).

``--saelens-python PATH`` also runs ``_support/saelens_baseline.py`` with that interpreter (a scratch
venv with sae-lens; sae-lens is not a dependency of this project): SAELens'
HookedSAETransformer on the same weights (the HF checkpoint converted to a HookedTransformer, the
same SAE directory) generating the same 64 greedy tokens under the same clamp, and prints
``ours / SAELens`` for the steered case (CPU time of each, same thread count).

Measured path and baselines: every case above is the production call (``backend.generate``); the
baseline of the last line is the empty-plan request through that same call, and SAELens' own
steered ``generate`` in ``_support/saelens_baseline.py`` (its only model call) is the peer baseline of
the ``ours / SAELens`` line only; its steered tokens equal to ours (printed) show it runs the same
model under the same edit.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SITE = "blocks.2.hook_resid_post"
LATENTS = tuple(range(100, 4096, 500))[:8]
VALUE = 5.0
PROMPT_TOKENS = 32
SAELENS_BASELINE = Path(__file__).resolve().parent / "_support" / "saelens_baseline.py"


def make_sae(architecture: str, seed: int):
    """A JumpReLU or TopK SAE (d_in 256, d_sae 4096) with Gaussian weights, hooked at SITE."""
    from sae_runtime.saes import SaeConfig, build_sae

    cfg = SaeConfig(architecture, d_in=256, d_sae=4096, k=32 if architecture == "topk" else None, hook_name=SITE)
    sae = build_sae(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(256, 4096, generator=g) / 16)
        sae.W_dec.copy_(torch.randn(4096, 256, generator=g) / 16)
        sae.b_enc.copy_(torch.randn(4096, generator=g) * 0.01)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
    return sae


def build_backend(root: Path):
    """Model + SAE files under ``root``, served by CausalLmBackend.from_spec; returns (backend, paths)."""
    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.spec import ModelSpec, SaeSpec
    from sae_runtime.demo.tiny_models import build_tiny_causal_lm
    from sae_runtime.formats import save_native, save_saelens

    lm = build_tiny_causal_lm(root / "lm", "llama", seed=0, vocab_size=2048, hidden_size=256, num_layers=4,
                              num_heads=4, intermediate_size=1024)
    save_saelens(make_sae("jumprelu", 1), root / "jr")
    save_native(make_sae("topk", 2), root / "tk")
    spec = ModelSpec(name="bench", kind="causal_lm", path=str(lm),
                     saes=(SaeSpec("jr", str(root / "jr")), SaeSpec("tk", str(root / "tk"))))
    backend = CausalLmBackend.from_spec(spec)
    backend.engine.eos_ids = frozenset()  # equal work in every case: 64 tokens each
    return backend, lm, root / "jr"


def prompt_of(backend, n_tokens: int) -> str:
    """A prompt of filler words that tokenises to exactly ``n_tokens`` ids (with the leading <s>)."""
    words = [f"w{(i * 37) % 1900}" for i in range(n_tokens - 1)]
    prompt = " ".join(words)
    assert len(backend.tokenizer(prompt)["input_ids"]) == n_tokens
    return prompt


def run_peer(python: str, lm: Path, sae_dir: Path, prompt_ids: list[int], args) -> dict | None:
    """SAELens' figures (see _support/saelens_baseline.py), or None with the reason printed."""
    cmd = [python, str(SAELENS_BASELINE), "--model", str(lm), "--sae", str(sae_dir), "--prompt-ids", json.dumps(prompt_ids),
           "--latents", json.dumps(list(LATENTS)), "--value", str(VALUE), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"SAELens peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--saelens-python", default=None, help="python of a venv with sae-lens (compare with SAELens)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sae_runtime.backends.types import SamplingParams, TextRequest
    from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec

    with tempfile.TemporaryDirectory(prefix="bench-steer-") as tmp:
        backend, lm, sae_dir = build_backend(Path(tmp))
        prompt = prompt_of(backend, PROMPT_TOKENS)
        sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)

        def clamp(name: str) -> InterventionPlan:
            return InterventionPlan((LatentEdit(name, EditOp.SET, LATENTS, VALUE),))

        cases = {
            "unsteered": TextRequest(prompt=prompt, sampling=sampling),
            "jumprelu clamp": TextRequest(prompt=prompt, plan=clamp("jr"), sampling=sampling),
            "topk clamp": TextRequest(prompt=prompt, plan=clamp("tk"), sampling=sampling),
            "jumprelu clamp + top-10 readout": TextRequest(prompt=prompt, plan=clamp("jr"), sampling=sampling,
                                                           readout=ReadoutSpec(("jr",), top_k=10)),
        }

        def run(request: TextRequest) -> tuple[float, float, tuple[int, ...]]:
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            [result] = backend.generate([request])
            w, c = time.perf_counter() - w0, time.process_time() - c0
            ids = tuple(t.id for t in result.steered.tokens)
            assert len(ids) == args.new_tokens, len(ids)
            return w, c, ids

        for request in cases.values():  # warm-up
            run(request)
        wall: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        outputs: dict[str, tuple[int, ...]] = {}
        for rep in range(args.repeats):
            order = list(cases.items())
            for name, request in order if rep % 2 == 0 else order[::-1]:  # alternate the order to cancel drift
                w, c, ids = run(request)
                wall[name].append(w)
                cpu[name].append(c)
                outputs[name] = ids
        prompt_ids = list(backend.validate(cases["unsteered"]).prompt_ids)
        peer = run_peer(args.saelens_python, lm, sae_dir, prompt_ids, args) if args.saelens_python else None

    med = {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in cases}
    base_wall, base_cpu = med["unsteered"]
    print(f"production path: CausalLmBackend.from_spec + backend.generate([TextRequest]) (engine, empty plan = baseline)")
    print(f"torch threads {torch.get_num_threads()}, prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats} alternated repeats")
    base_min = min(cpu["unsteered"])
    print(f"{'case':34s} {'wall ms':>8s} {'cpu ms':>8s} {'cpu ms/token':>12s} {'x wall':>7s} {'x cpu':>7s} {'x cpu(min)':>10s}")
    for name in cases:
        w, c = med[name]
        changed = "" if name == "unsteered" else f"  tokens changed: {outputs[name] != outputs['unsteered']}"
        print(f"{name:34s} {w * 1e3:8.1f} {c * 1e3:8.1f} {c / args.new_tokens * 1e3:12.3f} "
              f"{w / base_wall:7.3f} {c / base_cpu:7.3f} {min(cpu[name]) / base_min:10.3f}{changed}")
    if args.saelens_python is None:
        print("SAELens comparison skipped: pass --saelens-python PATH (a venv with sae-lens and torch==2.13.0)")
    elif peer is not None:
        same = sum(a == b for a, b in zip(peer["steered_tokens"], outputs["jumprelu clamp"]))
        print(f"SAELens {peer['sae_lens_version']} HookedSAETransformer (use_error_term, hook_sae_acts_post clamp); "
              f"steered tokens equal to ours (the same model, the same edit): {same}/{args.new_tokens}")
        print(f"{'SAELens jumprelu clamp (baseline)':34s} {peer['steered_wall'] * 1e3:8.1f} {peer['steered_cpu'] * 1e3:8.1f}")
        print(f"ratio ours / SAELens (jumprelu clamp, cpu): {med['jumprelu clamp'][1] / peer['steered_cpu']:.3f}")
    for name in list(cases)[2:]:
        print(f"ratio {name}: {med[name][1] / base_cpu:.3f}")
    print(f"ratio {med['jumprelu clamp'][1] / base_cpu:.3f}")


if __name__ == "__main__":
    sys.exit(main())
