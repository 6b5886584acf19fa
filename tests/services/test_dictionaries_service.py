"""The three dictionaries other than the SAE (G-SAE, SpaDE, FF-KV) loaded, steered and read out
through the real service (issue 13), each checked against the library or a hand computation.

The session serves the tiny LM twice: once with its ReLU SAE (``LM``) and once (``DICTS``) with a
top-k-sigmoid G-SAE, a SpaDE dictionary (both from native files) and the MLP neurons of layer
``FFKV_LAYER`` as an FF-KV dictionary built from the model's own weights at load time.
"""

from __future__ import annotations

import pytest
import torch

from sae_runtime.backends import types as rt
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec
from services.client import Generation, edit
from tests.services.helpers import DICTS, FFKV, FFKV_K, FFKV_LAYER, GSAE, GSAE_LABELS, LM, LM_HOOK, SPADE, one_thread


def test_list_models_describes_the_three_dictionaries(client, dicts_backend):
    (info,) = [m for m in client.list_models() if m.name == DICTS]
    saes = {s.name: s for s in info.saes}
    assert list(saes) == [GSAE, SPADE, FFKV]
    assert (saes[GSAE].architecture, saes[GSAE].hook_name, saes[GSAE].width, saes[GSAE].has_labels) == ("topk-sigmoid", LM_HOOK, 64, True)
    assert (saes[SPADE].architecture, saes[SPADE].hook_name, saes[SPADE].width, saes[SPADE].has_labels) == ("spade", LM_HOOK, 48, False)
    d_ff = dicts_backend.model.config.intermediate_size
    assert (saes[FFKV].architecture, saes[FFKV].width) == ("ffkv", d_ff)
    assert str(FFKV_LAYER) in saes[FFKV].hook_name and "mlp" in saes[FFKV].hook_name
    assert [(f.index, f.label) for f in client.search_features(DICTS, "color", sae=GSAE)] == sorted((i, lab) for lab, i in GSAE_LABELS.items())


CLAMPS = {
    # G-SAE: a labelled concept latent clamped to 1 (its latents live in (0, 1)), and the paper's
    # norm-relative additive steering along a concept's decoder direction.
    "gsae-set": (edit(GSAE, "set", "color:red", value=1.0), LatentEdit(GSAE, EditOp.SET, labels=("color:red",), value=1.0)),
    "gsae-add-normalized": (
        edit(GSAE, "add", "color:blue", value=4.0, normalize=True),
        LatentEdit(GSAE, EditOp.ADD, labels=("color:blue",), value=4.0, normalize=True),
    ),
    "spade-set": (edit(SPADE, "set", 3, value=6.0), LatentEdit(SPADE, EditOp.SET, latents=(3,), value=6.0)),
    "ffkv-set": (edit(FFKV, "set", 7, value=20.0), LatentEdit(FFKV, EditOp.SET, latents=(7,), value=20.0)),
}


@pytest.mark.parametrize("name", list(CLAMPS))
def test_an_edit_on_each_dictionary_equals_the_library_and_moves_the_output(client, dicts_backend, name):
    wire, library = CLAMPS[name]
    sae = library.sae
    response = client.generate(DICTS, "the red cat", edits=[wire], generation=Generation(max_new_tokens=8), seed=0,
                               include_default=True, return_latents=[sae], latents_top_k=3, return_logprobs=1)
    reference = rt.TextRequest(prompt="the red cat", plan=InterventionPlan(edits=(library,)),
                               sampling=rt.SamplingParams(max_new_tokens=8, seed=0, temperature=0.0),
                               include_default=True, readout=ReadoutSpec((sae,), 3))
    with one_thread():
        (expected,) = dicts_backend.generate([dicts_backend.validate(reference)])
    assert [t.id for t in response.completion.tokens] == [t.id for t in expected.steered.tokens]
    assert [t.id for t in response.default_completion.tokens] == [t.id for t in expected.default.tokens]
    # the edit moved the next-token distribution (greedy tokens of a random model may not change)
    steered, default = ([t.logprob for t in c.tokens] for c in (response.completion, response.default_completion))
    assert max(abs(a - b) for a, b in zip(steered, default)) > 1e-3
    for got, want in zip(response.prompt_latents, expected.prompt_latents, strict=True):
        assert got.saes[0].sae == sae
        assert [(a.index, a.label) for a in got.saes[0].after] == [(a.index, a.label or "") for a in want[0].after]
        assert [a.value for a in got.saes[0].after] == pytest.approx([a.value for a in want[0].after], abs=1e-4)
    if library.op is EditOp.SET:  # the clamped latent reads back at its value at every prompt position
        (target,) = dicts_backend.validate(reference).plan.edits[0].latents
        for p in response.prompt_latents:
            assert (target, pytest.approx(library.value, rel=1e-5)) in [(a.index, a.value) for a in p.saes[0].after]


def test_ffkv_readout_is_the_mlp_neurons_and_leaves_the_output_bit_identical(service, client):
    """Encode's FF-KV latents are the top-k of act(gate x) * (up x) at the layer's MLP input, computed
    here from the saved model with transformers; reading them leaves the generation unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "the red cat sat"
    response = client.encode(DICTS, text, saes=[FFKV], top_k=FFKV_K)
    model = AutoModelForCausalLM.from_pretrained(service.artifacts / "lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(service.artifacts / "lm")
    mlp = model.model.layers[FFKV_LAYER].mlp
    seen = {}
    handle = mlp.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    with one_thread(), torch.no_grad():
        model(**tokenizer(text, return_tensors="pt"))
        handle.remove()
        neurons = (torch.nn.functional.silu(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"]))[0]
    assert len(response.latents) == neurons.shape[0]
    for position, want in zip(response.latents, neurons, strict=True):
        top = want.topk(FFKV_K)
        got = sorted(((a.index, a.value) for a in position.saes[0].before), key=lambda iv: -iv[1])
        assert [i for i, _ in got] == top.indices.tolist()
        assert [v for _, v in got] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-5)

    options = dict(generation=Generation(max_new_tokens=6), seed=0, return_logprobs=1)
    read = client.generate(DICTS, text, return_latents=[FFKV], **options)
    plain = client.generate(LM, text, **options)
    assert [t.id for t in read.completion.tokens] == [t.id for t in plain.completion.tokens]
    assert [t.logprob for t in read.completion.tokens] == [t.logprob for t in plain.completion.tokens]
