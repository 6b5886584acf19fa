"""The step runner's lean Llama decode (sae_runtime/engine/step.py: llama_decode) against the
model's own forward: the same logits on a left-padded cache, hooks firing, and engine results
equal with it switched off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.engine.step import left_pad, llama_decode
from sae_runtime.sites import HookSite, attached
from tests.sae_runtime.test_engine import _backend, mixed_requests, same_result


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = build_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "m", "llama", seed=0, init_std=0.2)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def _prefilled(model, prompts):
    """A left-padded cache of ``prompts`` and the decode inputs of one more token per row."""
    ids, mask, positions = left_pad(prompts, 0, torch.device("cpu"))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1).bool()[:, None, None, :]
    return cache, mask, positions[:, -1:] + 1


def _copy(cache, model):
    out = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.clone(), layer.values.clone(), i)
    return out


@pytest.mark.parametrize("hooked", [False, True])
def test_the_lean_decode_gives_the_logits_and_cache_of_the_model_forward(llama, hooked):
    decode = llama_decode(llama)
    assert decode is not None
    cache, mask, positions = _prefilled(llama, [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]])
    tokens = torch.tensor([[1], [2], [3]])
    site = HookSite.parse("blocks.1.hook_resid_post")
    hooks = [(site, lambda x, grid: x + 0.5)] if hooked else []
    a, b = _copy(cache, llama), _copy(cache, llama)
    with torch.no_grad(), attached(llama, hooks):
        want = llama(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=a, use_cache=True).logits[:, -1]
        got = decode(tokens, mask, positions, b)
    assert torch.equal(got, want)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    if hooked:  # the hook fired on the lean path: its logits differ from an unhooked decode
        with torch.no_grad():
            plain = decode(tokens, mask, positions, _copy(cache, llama))
        assert not torch.allclose(plain, got)


def test_models_other_than_llama_take_their_own_forward(tmp_path):
    gpt2 = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path / "g", "gpt2", seed=0))
    assert llama_decode(gpt2) is None


def test_engine_results_are_the_same_with_the_lean_decode_switched_off(tmp_path):
    lean = _backend(tmp_path / "a", "llama")
    plain = _backend(tmp_path / "b", "llama")
    assert lean.engine.runner._lean_decode is not None
    plain.engine.runner._lean_decode = None
    requests = mixed_requests()
    for got, want in zip(lean.generate(requests), plain.generate(requests)):
        same_result(got, want)
