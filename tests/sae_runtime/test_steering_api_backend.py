"""The steering API's backend side on a tiny Llama loaded through from_pretrained: DiffMean steering
vectors against hidden states read with ``output_hidden_states``, declared vectors loaded from
safetensors, presets, variants (each equal to its own solo request) and stop_when in the engine
(the stop position checked against latents computed by hand from an unhooked forward)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from sae_runtime.backends.causal_lm import CausalLmBackend
from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec, VectorSpec
from sae_runtime.backends.types import SamplingParams, SteeringVectorRequest, TextRequest
from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.errors import InvalidArgument, NotFound, TooLarge
from sae_runtime.formats import save_native
from sae_runtime.plan import Compare, Condition, EditOp, InterventionPlan, LatentEdit, VectorEdit
from sae_runtime.saes import SaeConfig, build_sae

D_MODEL, D_SAE = 32, 64
POSITIVE = ("the cat is red", "a red bird sings")
NEGATIVE = ("the cat is blue", "where is the big house today")


def _sae(hook: str, seed: int):
    torch.manual_seed(seed)
    sae = build_sae(SaeConfig("standard", D_MODEL, D_SAE, hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0.0, 0.3)
    sae.labels = {"red": 3, "blue": 5}
    return sae


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("steering_api")
    build_tiny_causal_lm(root / "llama", "llama", seed=0, init_std=0.2)
    save_native(_sae("blocks.0.hook_resid_post", 1), root / "s0")
    save_native(_sae("blocks.1.hook_resid_post", 2), root / "s1")
    g = torch.Generator().manual_seed(7)
    save_file({"direction": torch.randn(D_MODEL, generator=g)}, str(root / "vec.safetensors"))
    save_file({"direction": torch.randn(D_MODEL + 1, generator=g)}, str(root / "wide.safetensors"))
    return root


def _spec(root, **kw) -> ModelSpec:
    return ModelSpec(
        name="tiny", kind="causal_lm", path=str(root / "llama"),
        saes=(SaeSpec("s0", str(root / "s0")), SaeSpec("s1", str(root / "s1"))),
        limits=Limits(max_prompt_tokens=32, max_new_tokens=32, max_vector_prompts=3), **kw,
    )


@pytest.fixture(scope="module")
def backend(root) -> CausalLmBackend:
    presets = (("red", InterventionPlan((LatentEdit("s0", EditOp.SET, labels=("red",), value=4.0),))),
               ("push", InterventionPlan(vectors=(VectorEdit(vector="v", value=2.0),))))
    return CausalLmBackend.from_spec(_spec(root, vectors=(VectorSpec("v", str(root / "vec.safetensors"), "blocks.0.hook_resid_post"),),
                                           presets=presets))


def _hidden_mean(backend: CausalLmBackend, prompts, layer: int) -> tuple[torch.Tensor, int]:
    """Mean of hidden_states[layer + 1] (resid_post of ``layer``; not the last layer, whose entry
    is after the final norm) over every prompt position."""
    rows = []
    for p in prompts:
        ids = torch.tensor([backend.tokenizer(p)["input_ids"]])
        with torch.no_grad():
            hs = backend.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        rows.append(hs.double())
    stacked = torch.cat(rows)
    return stacked.mean(0), stacked.shape[0]


def test_diff_mean_equals_hidden_state_means(backend):
    result = backend.compute_steering_vector(SteeringVectorRequest(POSITIVE, NEGATIVE, "blocks.0.hook_resid_post", sae="s0", top_n=4))
    pos, n_pos = _hidden_mean(backend, POSITIVE, 0)
    neg, n_neg = _hidden_mean(backend, NEGATIVE, 0)
    assert (result.n_positive_tokens, result.n_negative_tokens) == (n_pos, n_neg)
    torch.testing.assert_close(result.direction.double(), pos - neg, rtol=1e-5, atol=1e-5)
    rows = backend.saes["s0"].W_dec.detach().double()
    cos = torch.nn.functional.cosine_similarity(rows, (pos - neg)[None], dim=-1)
    assert [c[0] for c in result.closest] == cos.topk(4).indices.tolist()
    assert result.closest[0][2] == pytest.approx(float(cos.max()), abs=1e-5)


def test_steering_vector_request_errors(backend):
    with pytest.raises(NotFound) as err:
        backend.compute_steering_vector(SteeringVectorRequest(POSITIVE, NEGATIVE, "blocks.9.hook_resid_post"))
    assert err.value.field == "site"
    with pytest.raises(InvalidArgument) as err:
        backend.compute_steering_vector(SteeringVectorRequest((), NEGATIVE, "blocks.0.hook_resid_post"))
    assert err.value.field == "positive"
    with pytest.raises(TooLarge) as err:
        backend.compute_steering_vector(SteeringVectorRequest(POSITIVE, ("a",) * 4, "blocks.0.hook_resid_post"))
    assert err.value.field == "negative"
    with pytest.raises(NotFound) as err:
        backend.compute_steering_vector(SteeringVectorRequest(POSITIVE, NEGATIVE, "blocks.0.hook_resid_post", sae="nope"))
    assert err.value.field == "sae"


def test_declared_vector_width_is_checked_at_load(root):
    with pytest.raises(InvalidArgument) as err:
        CausalLmBackend.from_spec(_spec(root, vectors=(VectorSpec("w", str(root / "wide.safetensors"), "blocks.0.hook_resid_post"),)))
    assert err.value.field == "vectors.w"


def test_info_lists_presets_and_vectors(backend):
    info = backend.info()
    assert info.presets == ("red", "push")
    assert info.vectors == (("v", "blocks.0.hook_resid_post"),)


def _request(plan=InterventionPlan(), **kw) -> TextRequest:
    return TextRequest(prompt="the cat is", plan=plan, sampling=SamplingParams(max_new_tokens=6, temperature=0.9, seed=11), **kw)


def test_variants_equal_their_solo_requests(backend):
    plans = (
        InterventionPlan((LatentEdit("s0", EditOp.SET, (3,), 6.0),)),
        InterventionPlan((LatentEdit("s1", EditOp.ABLATE, (5, 7)),)),
        InterventionPlan(),
    )
    [result] = backend.generate([_request(plans[0], variants=plans[1:], include_default=True)])
    assert len(result.variants) == 2
    solo = backend.generate([_request(p) for p in plans])
    assert result.steered.tokens == solo[0].steered.tokens
    assert [v.completion.tokens for v in result.variants] == [s.steered.tokens for s in solo[1:]]
    assert result.default.tokens == solo[2].steered.tokens
    assert result.variants[0].plan.edits[0].latents == (5, 7)


def test_too_many_variants(backend):
    with pytest.raises(TooLarge) as err:
        backend.validate(_request(variants=(InterventionPlan(),) * (backend.limits.max_variants + 1)))
    assert err.value.field == "variants"


def test_variant_errors_name_the_variant(backend):
    bad = InterventionPlan((LatentEdit("s0", EditOp.SET, (D_SAE,), 1.0),))
    with pytest.raises(InvalidArgument) as err:
        backend.validate(_request(variants=(InterventionPlan(), bad)))
    assert err.value.field == "variants[1].edits[0].latents"


def test_preset_by_name_equals_its_inline_plan(backend):
    inline = InterventionPlan((LatentEdit("s0", EditOp.SET, (3,), 4.0), LatentEdit("s1", EditOp.ABLATE, (9,))))
    by_name = InterventionPlan((LatentEdit("s1", EditOp.ABLATE, (9,)),), presets=("red",))
    a, b = backend.generate([_request(inline), _request(by_name)])
    assert a.steered.tokens == b.steered.tokens
    assert b.plan.presets == () and [e.latents for e in b.plan.edits] == [(3,), (9,)]
    with pytest.raises(NotFound) as err:
        backend.validate(_request(InterventionPlan(presets=("nope",))))
    assert err.value.field == "plan.presets[0]"


def test_declared_vector_preset_equals_inline_vector(backend):
    direction = backend.plan_resources.vectors["v"].direction
    inline = InterventionPlan(vectors=(VectorEdit(values=tuple(direction.tolist()), site="blocks.0.hook_resid_post", value=2.0),))
    a, b = backend.generate([_request(inline), _request(InterventionPlan(presets=("push",)))])
    assert a.steered.tokens == b.steered.tokens
    plain = backend.generate([_request()])[0]
    assert plain.steered.tokens != a.steered.tokens  # the vector changes what the model says
    assert torch.equal(b.plan.vectors[0].direction, direction)


def _s0_latents(backend, ids: list[int]) -> torch.Tensor:
    """s0's latents at every position of ``ids`` from an unhooked forward: (T, d_sae)."""
    with torch.no_grad():
        hs = backend.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        return backend.saes["s0"].encode(hs)


def test_stop_when_stops_at_the_first_generated_position_where_it_holds(backend):
    base = backend.generate([_request()])[0]
    prompt_ids = backend.tokenizer("the cat is")["input_ids"]
    ids = prompt_ids + [t.id for t in base.steered.tokens]
    generated = _s0_latents(backend, ids)[len(prompt_ids):]  # (n_generated, d_sae)
    assert generated.shape[0] >= 3
    spread = generated[1:].amax(0) - generated[1:].amin(0)
    latent = int(spread.argmax())  # the latent that varies most after the first generated token
    values = generated[:, latent]
    threshold = float(values[1:].max() + values[1:].min()) / 2
    first = next(j for j, v in enumerate(values.tolist()) if v > threshold)
    stop = Condition("s0", latent, compare=Compare.ABOVE, threshold=threshold)
    result = backend.generate([_request(InterventionPlan(stop_when=stop)), _request()])
    steered = result[0].steered
    assert steered.finish_reason == "condition"
    assert (steered.stopped_by.position, steered.stopped_by.sae, steered.stopped_by.latent) == (first, "s0", latent)
    assert steered.stopped_by.value == pytest.approx(float(values[first]), abs=1e-4)
    assert [t.id for t in steered.tokens] == [t.id for t in base.steered.tokens[: first + 1]]
    assert result[1].steered.tokens == base.steered.tokens  # its batch mate is unchanged


def test_describe_resolves_to_the_best_matching_labelled_latent(backend):
    described = InterventionPlan((LatentEdit("s0", EditOp.SET, describe="the colour red", top_n=1, value=4.0),))
    by_index = InterventionPlan((LatentEdit("s0", EditOp.SET, (3,), 4.0),))
    a, b = backend.generate([_request(described), _request(by_index)])
    assert a.plan.edits[0].latents == (3,)  # what the description chose, returned with the result
    assert a.steered.tokens == b.steered.tokens
    with pytest.raises(InvalidArgument) as err:
        backend.validate(_request(InterventionPlan((LatentEdit("s0", EditOp.SET, describe="red", top_n=0),))))
    assert err.value.field == "plan.edits[0].top_n"
