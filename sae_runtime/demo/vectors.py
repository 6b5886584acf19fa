"""The demo LM's steering vectors: DiffMean directions between concept-world prompt sets.

    python -m sae_runtime.demo.vectors --model models/demo-lm/model --out models/demo-lm/vectors

For each colour c (here ``red``), the positive set is concept-world sentences stating colour c
and the negative set the same sentences with the other colours in turn; the vector is
mean(positive activations) - mean(negative activations) at ``blocks.2.hook_resid_post`` over every
prompt position (:mod:`sae_runtime.backends.steering_vectors`, the code behind the
ComputeSteeringVector RPC). Written as ``<out>/<c>.safetensors`` (one tensor, ``direction``) and
``<out>/vectors.json`` (site, prompt sets, norms), loaded by configs/demo.yaml's ``vectors:``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from safetensors.torch import save_file

from sae_runtime.demo import world

SITE = "blocks.2.hook_resid_post"
COLOURS = ("red",)


def colour_prompts(colour: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sentences stating ``colour``, the same sentences with each other colour), deterministic."""
    templates = ("the {animal} is {color} .", "a {color} {animal} runs .", "the {color} {animal} sleeps in the forest .")
    animals = world.FAMILIES["animal"]
    others = [c for c in world.FAMILIES["color"] if c != colour]
    pairs = [(t, a) for t in templates for a in animals]
    positive = tuple(t.format(animal=a, color=colour) for t, a in pairs)
    negative = tuple(t.format(animal=a, color=others[i % len(others)]) for i, (t, a) in enumerate(pairs))
    return positive, negative


def build_vectors(model_dir: str | Path, out: str | Path, colours: Sequence[str] = COLOURS) -> dict:
    """Compute and write the demo vectors; returns what vectors.json records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.spec import Limits
    from sae_runtime.backends.types import SteeringVectorRequest

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    backend = CausalLmBackend(model, AutoTokenizer.from_pretrained(str(model_dir)), {}, limits=Limits(max_vector_prompts=64))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"site": SITE, "vectors": {}}
    for colour in colours:
        positive, negative = colour_prompts(colour)
        result = backend.compute_steering_vector(SteeringVectorRequest(positive, negative, SITE))
        save_file({"direction": result.direction.contiguous()}, str(out / f"{colour}.safetensors"))
        record["vectors"][colour] = {"positive": list(positive), "negative": list(negative),
                                     "norm": float(result.direction.norm()), "tokens": [result.n_positive_tokens, result.n_negative_tokens]}
    (out / "vectors.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_runtime.demo.vectors", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/demo-lm/model")
    p.add_argument("--out", default="models/demo-lm/vectors")
    args = p.parse_args(argv)
    record = build_vectors(args.model, args.out)
    for name, v in record["vectors"].items():
        print(f"{name}: norm {v['norm']:.3f} over {v['tokens'][0]} + {v['tokens'][1]} tokens at {record['site']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
