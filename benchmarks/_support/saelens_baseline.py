"""The SAELens baseline of steering_overhead.py: HookedSAETransformer steered greedy generation.

Role: peer baseline only, never the measured path. The measured path (our engine through
``CausalLmBackend.generate``, the call the service makes) runs in steering_overhead.py; this
script exists only to time the peer library on the same work, for that script's
``ratio ours / SAELens`` line. It makes exactly one kind of model call: SAELens' own public
``HookedSAETransformer.generate`` under the SAE and the clamp (``baseline_steered_generate`` on ``baseline_model``), which
is the baseline that ratio divides by. No other forward runs here: no unsteered run, no logit
check. In ``baseline_model``, ``AutoModelForCausalLM.from_pretrained`` only reads the checkpoint's weights so that
TransformerLens' ``convert_llama_weights`` can build the HookedTransformer; it is never called.
That the converted model is the same model is shown by steering_overhead.py, which checks that
the steered tokens printed here equal ours.

Run with the python of a scratch venv holding sae-lens (and torch==2.13.0); it imports nothing
from this project. The HF Llama checkpoint at ``--model`` is converted with TransformerLens' own
Llama config mapping and ``convert_llama_weights`` (no weight processing, so
``blocks.L.hook_resid_post`` is the HF decoder layer's output); the SAE directory ``--sae`` (a
SAELens directory) is loaded with ``SAE.load_from_disk`` and attached with ``use_error_term=True``;
the clamp is a hook on ``hook_sae_acts_post`` setting ``--latents`` to ``--value``. Each run
generates ``--new-tokens`` greedy tokens from ``--prompt-ids`` with the KV cache, EOS ignored.

Prints one JSON line: the median wall and CPU seconds of the steered generation (after a
warm-up), its tokens, and the sae-lens version.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from importlib.metadata import version

import torch


def baseline_model(path: str):
    """The peer baseline's model: a HookedSAETransformer with the weights of the HF Llama checkpoint
    at ``path``, config mapped as TransformerLens does. The HF model object is only a weight
    container for ``convert_llama_weights``; it is never run."""
    from sae_lens import HookedSAETransformer
    from transformers import AutoModelForCausalLM

    return hooked_llama(AutoModelForCausalLM.from_pretrained(path), HookedSAETransformer)  # weights only, never called


def hooked_llama(hf_model, cls):
    """A ``cls`` (HookedSAETransformer) with the HF Llama's weights, config mapped as TransformerLens does."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps, d_vocab=c.vocab_size, act_fn=c.hidden_act,
        n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=c.hidden_size // c.num_attention_heads, rotary_base=10000.0, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, device="cpu", dtype=torch.float32,
    )
    model = cls(cfg)
    model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--prompt-ids", required=True, help="JSON list of token ids")
    ap.add_argument("--latents", required=True, help="JSON list of latent indices to clamp")
    ap.add_argument("--value", type=float, required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sae_lens import SAE

    peer_baseline = baseline_model(args.model)  # the peer library's model: the baseline, not the measured path
    sae = SAE.load_from_disk(args.sae)
    hook = sae.cfg.metadata.hook_name
    latents = torch.tensor(json.loads(args.latents))
    prompt = torch.tensor([json.loads(args.prompt_ids)])

    def clamp(acts: torch.Tensor, hook=None) -> torch.Tensor:
        acts[..., latents] = args.value
        return acts

    def baseline_steered_generate() -> tuple[float, float, list[int]]:
        """The timed peer baseline (the denominator of steering_overhead.py's ``ours / SAELens``):
        SAELens' own generate under the SAE (error term kept) and the clamp."""
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        with peer_baseline.saes(saes=[sae], use_error_term=True):
            with peer_baseline.hooks(fwd_hooks=[(f"{hook}.hook_sae_acts_post", clamp)]):
                # BASELINE: the peer library's steered generation, timed as the baseline only
                out = peer_baseline.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, stop_at_eos=False,
                                             use_past_kv_cache=True, verbose=False)
        return time.perf_counter() - w0, time.process_time() - c0, out[0, prompt.shape[1]:].tolist()

    baseline_steered_generate()  # warm-up
    runs = [baseline_steered_generate() for _ in range(args.repeats)]
    print(json.dumps({
        "sae_lens_version": version("sae-lens"),
        "steered_wall": statistics.median(r[0] for r in runs), "steered_cpu": statistics.median(r[1] for r in runs),
        "steered_tokens": runs[-1][2],
    }))


if __name__ == "__main__":
    main()
