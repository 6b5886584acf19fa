"""Issue #16's API surface: conditions, projection edits, steering vectors, variants, presets,
describe, stop_when and ComputeSteeringVector, from the proto to the wire and back.

Three layers: conversion (proto <-> sae_runtime, every new message both ways, malformed messages
named by field), config (vectors and presets, written as request plans), and end to end through
the session's Ray Serve gRPC (and HTTP) service. The end-to-end numbers are checked against an
independent computation written here: the saved model run with transformers and a forward hook
on decoder layer 0 (the LM's SAE site, blocks.0.hook_resid_post) that applies the README's
formulas to the unhooked activations, with greedy decoding by full recomputation.
"""

from __future__ import annotations

import json

import grpc
import pytest
import requests
import torch
from google.protobuf import json_format
from steering.v1 import steering_pb2 as pb

from sae_runtime.backends import types as rt
from sae_runtime.backends.feature_search import FeatureMatch
from sae_runtime.backends.spec import Limits, VectorSpec
from sae_runtime.errors import InvalidArgument, NotFound, SaeRuntimeError, TooLarge
from sae_runtime.plan import (
    Compare,
    Condition,
    EditOp,
    InterventionPlan,
    LatentEdit,
    Scope,
    TokenScope,
    VectorEdit,
)
from services import cli, convert
from services.client import Generation, SteeringError, all_of, any_of, edit, plan, vector, when
from services.config import ConfigError, parse_config, preset_plan
from services.k8s_render import render_serve_config
from tests.services.helpers import LM, LM_HOOK, LM_LABELS, LM_LIMITS, LM_PRESETS, LM_SAE, LM_VECTOR, LM_VECTOR_KEY, one_thread

D_MODEL = 32  # the session LM's width at LM_HOOK
RED = LM_LABELS["color:red"]
LIMITS = Limits(max_variants=2, max_inline_vector_dims=8, max_vector_prompts=3)


# =============================================================================================
# Conversion
# =============================================================================================


def full_plan_message() -> pb.InterventionPlan:
    condition = all_of(when(LM_SAE, "color:red", above=0.5), any_of(when(LM_SAE, 7, below=2.0), when("other", 1, above=0.0)))
    return plan(
        [edit(LM_SAE, "project_set", 3, value=1.5, condition=condition),
         edit(LM_SAE, "set", describe="the colour red", top_n=2, value=4.0),
         edit(LM_SAE, "project_cap", "animal:cat", value=0.25)],
        vectors=[vector(LM_VECTOR, value=2.0),
                 vector(values=[0.5, -1.0, 0.0, 2.0], site=LM_HOOK, op="project_cap", value=0.25, condition=when(LM_SAE, 9, above=3.0)),
                 vector(values=[1.0, 1.0], site="layers.1", value=0.5, normalize=True)],
        presets=["red", "shifted"],
        stop_when=any_of(when(LM_SAE, 9, above=3.0), when(LM_SAE, "mood:happy", below=-1.0)),
        tokens="generated",
    )


def full_plan_expected() -> InterventionPlan:
    leaf = Condition(sae=LM_SAE, latent=9, compare=Compare.ABOVE, threshold=3.0)
    return InterventionPlan(
        edits=(
            LatentEdit(LM_SAE, EditOp.PROJECT_SET, latents=(3,), value=1.5, condition=Condition(all_of=(
                Condition(sae=LM_SAE, label="color:red", compare=Compare.ABOVE, threshold=0.5),
                Condition(any_of=(Condition(sae=LM_SAE, latent=7, compare=Compare.BELOW, threshold=2.0),
                                  Condition(sae="other", latent=1, threshold=0.0))),
            ))),
            LatentEdit(LM_SAE, EditOp.SET, value=4.0, describe="the colour red", top_n=2),
            LatentEdit(LM_SAE, EditOp.PROJECT_CAP, labels=("animal:cat",), value=0.25),
        ),
        scope=Scope(tokens=TokenScope.GENERATED),
        vectors=(
            VectorEdit(vector=LM_VECTOR, op=EditOp.ADD, value=2.0),
            VectorEdit(values=(0.5, -1.0, 0.0, 2.0), site=LM_HOOK, op=EditOp.PROJECT_CAP, value=0.25, condition=leaf),
            VectorEdit(values=(1.0, 1.0), site="layers.1", op=EditOp.ADD, value=0.5, normalize=True),
        ),
        stop_when=Condition(any_of=(leaf, Condition(sae=LM_SAE, label="mood:happy", compare=Compare.BELOW, threshold=-1.0))),
        presets=("red", "shifted"),
    )


def test_a_full_plan_converts_to_the_library_types_and_back():
    msg = full_plan_message()
    assert convert.plan_from_proto(msg) == full_plan_expected()
    assert convert.plan_to_proto(full_plan_expected()) == msg
    # through protobuf's JSON mapping (the HTTP mirror, config presets) and the wire format too
    assert convert.plan_from_proto(json_format.ParseDict(json_format.MessageToDict(msg), pb.InterventionPlan())) == full_plan_expected()
    assert convert.plan_from_proto(pb.InterventionPlan.FromString(msg.SerializeToString())) == full_plan_expected()


def test_variants_convert_in_order_with_the_request():
    request = pb.GenerateRequest(model="m", prompt="hi", plan=full_plan_message(), seed=5,
                                 variants=[plan([edit(LM_SAE, "ablate", 5)]), pb.InterventionPlan(), full_plan_message()])
    converted = convert.text_request_from_proto(request, [LM_SAE])
    assert converted.plan == full_plan_expected() and converted.sampling.seed == 5
    assert converted.variants == (InterventionPlan(edits=(LatentEdit(LM_SAE, EditOp.ABLATE, latents=(5,)),)), InterventionPlan(),
                                  full_plan_expected())
    multimodal = pb.GenerateMultimodalRequest(model="m", prompt="hi", image=b"png", variants=[pb.InterventionPlan()])
    assert convert.text_request_from_proto(multimodal, []).variants == (InterventionPlan(),)


def test_steered_means_the_request_plan_edits_something():
    def steered(**fields) -> bool:
        return convert.is_steered(convert.text_request_from_proto(pb.GenerateRequest(model="m", prompt="p", **fields), []))

    assert steered(plan=plan(presets=["red"])) and steered(plan=plan(vectors=[vector("shift")]))
    assert not steered(plan=plan(stop_when=when(LM_SAE, 1, above=0.0)))  # stop_when only reads
    assert not steered(variants=[plan([edit(LM_SAE, "ablate", 1)])])  # `steered` is about `completion`


def _deep(depth: int) -> pb.Condition:
    c = when(LM_SAE, 1, above=0.0)
    for _ in range(depth - 1):
        c = all_of(c)
    return c


def _with_condition(c: pb.Condition) -> pb.InterventionPlan:
    return plan([edit(LM_SAE, "set", 3, value=1.0, condition=c)])


MALFORMED = {
    "node with a leaf field": (_with_condition(pb.Condition(sae=LM_SAE, any_of=[when(LM_SAE, 1, above=0)])),
                               "plan.edits[0].condition.sae"),
    "node with a threshold": (_with_condition(pb.Condition(threshold=1.0, all_of=[when(LM_SAE, 1, above=0)])),
                              "plan.edits[0].condition.threshold"),
    "node with both children kinds": (_with_condition(pb.Condition(all_of=[when(LM_SAE, 1, above=0)], any_of=[when(LM_SAE, 2, above=0)])),
                                      "plan.edits[0].condition.any_of"),
    "leaf without sae": (_with_condition(pb.Condition(latent=1)), "plan.edits[0].condition.sae"),
    "leaf with latent and label": (_with_condition(pb.Condition(sae=LM_SAE, latent=1, label="color:red")),
                                   "plan.edits[0].condition.latent"),
    "leaf with neither": (_with_condition(pb.Condition(sae=LM_SAE, threshold=1.0)), "plan.edits[0].condition.latent"),
    "deep child named": (_with_condition(any_of(when(LM_SAE, 1, above=0), pb.Condition(sae=LM_SAE))),
                         "plan.edits[0].condition.any_of[1].latent"),
    "too deep": (_with_condition(_deep(5)), "plan.edits[0].condition.all_of[0].all_of[0].all_of[0].all_of[0]"),
    "unknown compare": (_with_condition(pb.Condition(sae=LM_SAE, latent=1, compare=9)), "plan.edits[0].condition.compare"),
    "stop_when malformed": (pb.InterventionPlan(stop_when=pb.Condition(sae=LM_SAE)), "plan.stop_when.latent"),
    "vector with name and values": (plan(vectors=[pb.VectorEdit(vector="v", values=[1.0], site=LM_HOOK, op=pb.EDIT_OP_ADD)]),
                                    "plan.vectors[0].vector"),
    "vector with neither": (plan(vectors=[pb.VectorEdit(op=pb.EDIT_OP_ADD)]), "plan.vectors[0].vector"),
    "inline vector without site": (plan(vectors=[pb.VectorEdit(values=[1.0], op=pb.EDIT_OP_ADD)]), "plan.vectors[0].site"),
    "declared vector with a site": (plan(vectors=[pb.VectorEdit(vector="v", site=LM_HOOK, op=pb.EDIT_OP_ADD)]), "plan.vectors[0].site"),
    "vector with a latent op": (plan(vectors=[pb.VectorEdit(vector="v", op=pb.EDIT_OP_SET)]), "plan.vectors[0].op"),
    "vector without op": (plan(vectors=[pb.VectorEdit(vector="v")]), "plan.vectors[0].op"),
    "vector condition": (plan(vectors=[vector("v", condition=pb.Condition(sae=LM_SAE))]), "plan.vectors[0].condition.latent"),
    "top_n beyond 64": (plan([edit(LM_SAE, "set", describe="red", top_n=65)]), "plan.edits[0].top_n"),
    "top_n without describe": (plan([edit(LM_SAE, "set", 3, top_n=2)]), "plan.edits[0].top_n"),
    "empty preset name": (plan(presets=[""]), "plan.presets[0]"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_plans_are_invalid_argument_naming_the_field(case):
    msg, field = MALFORMED[case]
    with pytest.raises(InvalidArgument) as err:
        convert.plan_from_proto(msg)
    assert err.value.field == field
    with pytest.raises(InvalidArgument) as err:  # the same message as a variant is named as one
        convert.text_request_from_proto(pb.GenerateRequest(model="m", prompt="p", variants=[pb.InterventionPlan(), msg]), [])
    assert err.value.field == "variants[1]" + field[len("plan"):]


def test_a_condition_at_the_depth_limit_converts():
    assert convert.plan_from_proto(_with_condition(_deep(4))).edits[0].condition.all_of[0].all_of[0].all_of[0].latent == 1


def test_too_many_variants_or_inline_floats_are_too_large_naming_the_field():
    def request(variants=(), vectors=()):
        return pb.GenerateRequest(model="m", prompt="p", plan=plan(vectors=vectors), variants=list(variants))

    inline = [vector(values=[1.0] * 4, site=LM_HOOK)]
    ok = request(variants=[plan(vectors=inline)] * 1, vectors=inline)  # 8 floats, 1 variant: at the limits
    assert len(convert.text_request_from_proto(ok, [], limits=LIMITS).variants) == 1
    with pytest.raises(TooLarge) as err:
        convert.text_request_from_proto(request(variants=[pb.InterventionPlan()] * 3), [], limits=LIMITS)
    assert err.value.field == "variants"
    with pytest.raises(TooLarge) as err:
        convert.text_request_from_proto(request(variants=[plan(vectors=inline * 2)], vectors=inline), [], limits=LIMITS)
    assert err.value.field == "variants[0].vectors[1].values"  # 4 + 4 + 4 > 8: the vector that crosses the cap
    with pytest.raises(TooLarge) as err:
        convert.text_request_from_proto(request(vectors=[vector(values=[0.0] * 9, site=LM_HOOK)]), [], limits=LIMITS)
    assert err.value.field == "plan.vectors[0].values"


def test_results_carry_variants_the_plan_as_run_and_where_stop_when_held():
    ran = InterventionPlan(edits=(LatentEdit(LM_SAE, EditOp.SET, latents=(3, 4), value=4.0, describe="the colour red", top_n=2),),
                           vectors=(VectorEdit(vector=LM_VECTOR, site=LM_HOOK, value=2.0),))
    token = rt.GeneratedToken(11, "a", logprob=-0.5)
    result = rt.TextResult(
        steered=rt.Completion("a", (token,), "condition", stopped_by=rt.ConditionHit(position=0, sae=LM_SAE, latent=9, value=3.25)),
        plan=ran,
        variants=(rt.VariantResult(rt.Completion("a a", (token, token), "length"), rt.RiskScore(0.25), InterventionPlan()),
                  rt.VariantResult(rt.Completion("", (), "eos"))),
    )
    msg = convert.text_result_to_proto(result, timings=pb.Timings(), versions=pb.Versions(), steered=True)
    assert msg.completion.finish_reason == "condition"
    hit = msg.completion.stopped_by
    assert (hit.position, hit.sae, hit.latent, hit.value) == (0, LM_SAE, 9, 3.25)
    (chosen,) = msg.plan.edits
    assert (list(chosen.latents), chosen.describe, chosen.top_n, chosen.op) == ([3, 4], "the colour red", 2, pb.EDIT_OP_SET)
    assert msg.plan.vectors[0].vector == LM_VECTOR and msg.plan.vectors[0].site == ""  # a declared vector: its name only
    assert [v.completion.text for v in msg.variants] == ["a a", ""]
    assert [len(v.completion.tokens) for v in msg.variants] == [2, 0]
    assert msg.variants[0].risk.score == 0.25 and not msg.variants[1].HasField("risk")
    assert msg.variants[0].HasField("plan") and not msg.variants[1].HasField("plan")
    bare = convert.text_result_to_proto(rt.TextResult(steered=rt.Completion("", (), "eos")), timings=pb.Timings(), versions=pb.Versions(),
                                        steered=False)
    assert not bare.HasField("plan") and not bare.variants and not bare.completion.HasField("stopped_by")


def test_model_info_lists_presets_and_vectors():
    info = rt.ModelInfo("m", "causal_lm", "", (), False, "v1", presets=("red", "no_red"), vectors=(("shift", LM_HOOK),))
    msg = convert.model_info_to_proto(info)
    assert list(msg.presets) == ["red", "no_red"]
    assert [(v.name, v.site) for v in msg.vectors] == [("shift", LM_HOOK)]


def test_steering_vector_request_and_result_convert():
    sites = {LM_SAE: LM_HOOK}
    msg = pb.ComputeSteeringVectorRequest(model="m", positive=["a", "b"], negative=["c"], sae=LM_SAE)
    assert convert.steering_vector_request_from_proto(msg, LIMITS, sites) == rt.SteeringVectorRequest(
        positive=("a", "b"), negative=("c",), site=LM_HOOK, sae=LM_SAE, top_n=convert.DEFAULT_VECTOR_TOP_N)
    explicit = pb.ComputeSteeringVectorRequest(model="m", positive=["a"], negative=["c"], site="layers.1", top_n=7)
    assert convert.steering_vector_request_from_proto(explicit, LIMITS, sites) == rt.SteeringVectorRequest(("a",), ("c",), "layers.1", "", 7)
    bad = {
        "positive": (pb.ComputeSteeringVectorRequest(negative=["c"], site="layers.1"), InvalidArgument),
        "negative": (pb.ComputeSteeringVectorRequest(positive=["a"], negative=["c"] * 4, site="layers.1"), TooLarge),
        "positive[1]": (pb.ComputeSteeringVectorRequest(positive=["a", ""], negative=["c"], site="layers.1"), InvalidArgument),
        "site": (pb.ComputeSteeringVectorRequest(positive=["a"], negative=["c"]), InvalidArgument),
        "sae": (pb.ComputeSteeringVectorRequest(positive=["a"], negative=["c"], sae="nope"), NotFound),
        "top_n": (pb.ComputeSteeringVectorRequest(positive=["a"], negative=["c"], site="layers.1", top_n=257), InvalidArgument),
    }
    for field, (request, error) in bad.items():
        with pytest.raises(error) as err:
            convert.steering_vector_request_from_proto(request, LIMITS, sites)
        assert err.value.field == field

    result = rt.SteeringVectorResult(site=LM_HOOK, direction=torch.tensor([0.5, -1.25, 2.0]), n_positive_tokens=7, n_negative_tokens=5,
                                     sae=LM_SAE, closest=((3, "color:red", 0.75), (8, None, -0.5)))
    out = convert.steering_vector_result_to_proto(result, timings=pb.Timings(compute_ms=1), versions=pb.Versions(model="m"))
    assert (out.site, list(out.values), out.n_positive_tokens, out.n_negative_tokens, out.sae) == (LM_HOOK, [0.5, -1.25, 2.0], 7, 5, LM_SAE)
    assert [(m.latent, m.label, m.cosine) for m in out.closest] == [(3, "color:red", 0.75), (8, "", -0.5)]
    assert out.timings.compute_ms == 1 and out.versions.model == "m"


def test_search_requests_pass_semantic_only_when_set_and_features_carry_their_score():
    assert convert.search_options_from_proto(pb.SearchFeaturesRequest(query="red")) == {}
    assert convert.search_options_from_proto(pb.SearchFeaturesRequest(query="red", semantic=False)) == {"semantic": False}
    # needs the search room: FeatureMatch.score
    feature = convert.feature_to_proto(FeatureMatch(LM_SAE, 3, "color:red", score=0.625))
    assert (feature.sae, feature.index, feature.label, feature.score) == (LM_SAE, 3, "color:red", 0.625)


# =============================================================================================
# Config
# =============================================================================================


def model_entry(**overrides) -> dict:
    entry = {"name": "lm", "kind": "causal_lm", "path": "models/lm", "saes": [{"name": LM_SAE, "path": "saes/res"}]}
    entry.update(overrides)
    return {"models": [entry]}


def test_config_vectors_presets_and_limits_reach_the_model_spec(tmp_path):
    data = model_entry(
        vectors={"shift": {"path": "v/shift.safetensors", "hook_name": LM_HOOK, "tensor_key": "direction"},
                 "other": {"path": "~/other.safetensors", "hook_name": "layers.1"}},
        presets=LM_PRESETS | {"both": {"edits": LM_PRESETS["red"]["edits"], "vectors": [{"vector": "shift", "op": "EDIT_OP_PROJECT_CAP"}]}},
        limits={"max_inline_vector_dims": 100, "max_variants": 3, "max_vector_prompts": 5},
    )
    spec = parse_config(data).models[0].to_spec(tmp_path)
    assert spec.vectors[0] == VectorSpec("shift", str(tmp_path / "v" / "shift.safetensors"), LM_HOOK, "direction")
    assert spec.vectors[1].name == "other" and spec.vectors[1].tensor_key is None and "~" not in spec.vectors[1].path
    assert [name for name, _ in spec.presets] == ["red", "shifted", "both"]
    presets = dict(spec.presets)
    assert presets["red"] == InterventionPlan(edits=(LatentEdit(LM_SAE, EditOp.SET, labels=("color:red",), value=8.0),))
    assert presets["shifted"] == InterventionPlan(vectors=(VectorEdit(vector=LM_VECTOR, op=EditOp.ADD, value=2.0),))
    assert presets["both"].vectors == (VectorEdit(vector="shift", op=EditOp.PROJECT_CAP, value=1.0),)
    assert (spec.limits.max_inline_vector_dims, spec.limits.max_variants, spec.limits.max_vector_prompts) == (100, 3, 5)
    assert parse_config(model_entry()).models[0].to_spec(tmp_path).limits.max_variants == Limits().max_variants


def test_a_preset_is_written_exactly_as_a_request_plan():
    msg = full_plan_message()
    body = json_format.MessageToDict(msg)
    body = {k: v for k, v in body.items() if k in ("edits", "vectors")}
    assert preset_plan("p", body) == convert.plan_from_proto(json_format.ParseDict(body, pb.InterventionPlan()))
    assert preset_plan("p", body).edits == full_plan_expected().edits


def test_render_serve_config_carries_vectors_and_presets_through(tmp_path):
    config = parse_config(model_entry(vectors={"shift": {"path": "v.safetensors", "hook_name": LM_HOOK}}, presets=LM_PRESETS
                                      | {"shifted": {"vectors": [{"vector": "shift", "op": "EDIT_OP_ADD"}]}}))
    args = render_serve_config(config, base_dir=tmp_path)["applications"][0]["args"]
    again = parse_config(args["config"])
    assert again.models[0].to_spec(tmp_path) == config.models[0].to_spec(tmp_path)


def test_a_missing_vector_file_fails_before_the_service_starts(tmp_path):
    from services.app import check_local_paths

    (tmp_path / "lm").mkdir()
    config = parse_config({"models": [{"name": "lm", "kind": "causal_lm", "path": "lm",
                                       "vectors": {"v": {"path": "v.safetensors", "hook_name": LM_HOOK}}}]})
    with pytest.raises(ConfigError, match=r"models\.0\.vectors\.v\.path"):
        check_local_paths(config, tmp_path)
    (tmp_path / "v.safetensors").write_bytes(b"")
    check_local_paths(config, tmp_path)


BAD_CONFIGS = {
    "vector without hook_name": ({"vectors": {"v": {"path": "v.st"}}}, "vectors.v.hook_name"),
    "vector with an unknown key": ({"vectors": {"v": {"path": "v.st", "hook_name": LM_HOOK, "layer": 2}}}, "vectors.v.layer"),
    "vector with a bad name": ({"vectors": {"a b": {"path": "v.st", "hook_name": LM_HOOK}}}, "vectors"),
    "preset with an unknown op": ({"presets": {"p": {"edits": [{"sae": LM_SAE, "op": "EDIT_OP_PAINT"}]}}}, "presets.p.edits"),
    "preset with an unknown field": ({"presets": {"p": {"edits": [{"sae": LM_SAE, "op": "EDIT_OP_SET", "colour": 1}]}}}, "colour"),
    "preset with a scope": ({"presets": {"p": {"scope": {"tokens": "TOKEN_SCOPE_PROMPT"}}}}, "presets.p.scope"),
    "preset naming presets": ({"presets": {"p": {"presets": ["q"]}}}, "presets.p.presets"),
    "preset on an unknown SAE": ({"presets": {"p": {"edits": [{"sae": "nope", "op": "EDIT_OP_SET"}]}}}, "presets.p.edits[0].sae"),
    "preset on an undeclared vector": ({"presets": {"p": {"vectors": [{"vector": "nope", "op": "EDIT_OP_ADD"}]}}},
                                       "presets.p.vectors[0].vector"),
    "preset with a malformed condition": ({"presets": {"p": {"edits": [{"sae": LM_SAE, "op": "EDIT_OP_SET", "latents": [1],
                                                                        "condition": {"sae": LM_SAE}}]}}},
                                          "presets.p.edits[0].condition.latent"),
    "preset that is not a mapping": ({"presets": {"p": ["red"]}}, "presets.p"),
    "preset with a bad name": ({"presets": {"-p": {}}}, "presets"),
    "negative max_variants": ({"limits": {"max_variants": -1}}, "limits.max_variants"),
    "zero max_vector_prompts": ({"limits": {"max_vector_prompts": 0}}, "limits.max_vector_prompts"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_vectors_presets_and_limits_fail_naming_the_field(case):
    overrides, where = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as err:
        parse_config(model_entry(**overrides))
    assert where in str(err.value)


# =============================================================================================
# End to end (the session's service), against hand computations
# =============================================================================================


class HandLm:
    """The session LM with transformers, its SAE's tensors, and greedy decoding by full
    recomputation with ``edit(x, n_prompt)`` applied to decoder layer 0's output (the SAE site)."""

    def __init__(self, artifacts) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(artifacts / "lm")
        self.model = AutoModelForCausalLM.from_pretrained(artifacts / "lm", torch_dtype=torch.float32).eval()
        w = load_file(str(artifacts / "saes" / LM_SAE / "sae.safetensors"))
        cfg = json.loads((artifacts / "saes" / LM_SAE / "sae.json").read_text())
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
        self.apply_b_dec = cfg.get("apply_b_dec_to_input", True)
        self.vector = load_file(str(artifacts / "vectors" / f"{LM_VECTOR}.safetensors"))[LM_VECTOR_KEY]
        eos = {self.tok.eos_token_id, *_as_list(getattr(self.model.generation_config, "eos_token_id", None))}
        self.eos = {int(e) for e in eos if e is not None}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Standard (ReLU) SAE latents of activations x (..., d)."""
        return torch.relu(((x - self.b_dec) if self.apply_b_dec else x) @ self.W_enc + self.b_enc)

    def ids(self, prompt: str) -> list[int]:
        return list(self.tok(prompt)["input_ids"])

    def site_activations(self, ids: list[int]) -> torch.Tensor:
        """Layer 0's output (T, d) for ``ids``, unhooked."""
        seen = []
        handle = self.model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0]))
        try:
            with torch.no_grad(), one_thread():
                self.model(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            handle.remove()
        return seen[0].clone()

    def generate(self, prompt: str, n: int, edit=None) -> tuple[list[int], list[float]]:
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            y = edit(x[0], n_prompt).unsqueeze(0)
            return (y, *output[1:]) if isinstance(output, tuple) else y

        seq = self.ids(prompt)
        n_prompt = len(seq)
        handle = self.model.model.layers[0].register_forward_hook(hook) if edit is not None else None
        tokens, logprobs = [], []
        try:
            with torch.no_grad(), one_thread():
                for _ in range(n):
                    logits = self.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                    nxt = int(logits.argmax())
                    if nxt in self.eos:
                        break
                    tokens.append(nxt)
                    logprobs.append(float(logits.log_softmax(-1)[nxt]))
                    seq.append(nxt)
        finally:
            if handle is not None:
                handle.remove()
        return tokens, logprobs

    def unit(self, latent: int) -> torch.Tensor:
        return self.W_dec[latent] / self.W_dec[latent].norm()


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


@pytest.fixture(scope="module")
def hand(service) -> HandLm:
    return HandLm(service.artifacts)


def ids(completion) -> list[int]:
    return [t.id for t in completion.tokens]


def logprobs(completion) -> list[float]:
    return [t.logprob for t in completion.tokens]


def assert_matches(completion, expected: tuple[list[int], list[float]]) -> None:
    assert ids(completion) == expected[0]
    assert logprobs(completion) == pytest.approx(expected[1], abs=2e-4)


def greedy(n: int) -> Generation:
    return Generation(max_new_tokens=n)


PROMPT = "the red cat sat on the mat"


def test_the_hand_reference_reproduces_the_unsteered_model_and_a_plain_clamp(client, hand):
    """The reference itself, on what the service already did before #16: x + (v - f_i) W_dec[i]."""
    response = client.generate(LM, PROMPT, edits=[edit(LM_SAE, "set", "color:red", value=20.0)], generation=greedy(8), seed=0,
                               include_default=True, return_logprobs=1)
    clamp = hand.generate(PROMPT, 8, lambda x, _: x + (20.0 - hand.encode(x)[:, RED]).unsqueeze(-1) * hand.W_dec[RED])
    assert_matches(response.completion, clamp)
    assert_matches(response.default_completion, hand.generate(PROMPT, 8))
    assert clamp[0] != ids(response.default_completion)


def test_list_models_lists_presets_and_vectors(client):
    lm = {m.name: m for m in client.list_models()}[LM]
    assert list(lm.presets) == list(LM_PRESETS)
    assert [(v.name, v.site) for v in lm.vectors] == [(LM_VECTOR, LM_HOOK)]


def test_variants_each_equal_their_plan_alone_with_the_request_seed(client, lm_backend):
    main = [edit(LM_SAE, "set", "color:red", value=8.0)]
    sweep = [plan([edit(LM_SAE, "set", "color:red", value=v)]) for v in (2.0, 16.0)] + [pb.InterventionPlan()]
    response = client.generate(LM, "the dog", edits=main, variants=sweep, generation=Generation(max_new_tokens=6, temperature=0.9),
                               seed=7, include_default=True, return_logprobs=1)
    assert len(response.variants) == len(sweep)

    def alone(edits) -> rt.TextResult:
        request = rt.TextRequest(prompt="the dog", plan=InterventionPlan(edits=tuple(edits)),
                                 sampling=rt.SamplingParams(max_new_tokens=6, temperature=0.9, seed=7), logprobs=1)
        with one_thread():
            (result,) = lm_backend.generate([lm_backend.validate(request)])
        return result

    red = lambda v: LatentEdit(LM_SAE, EditOp.SET, labels=("color:red",), value=v)  # noqa: E731
    expected_main = alone([red(8.0)])
    assert ids(response.completion) == [t.id for t in expected_main.steered.tokens]
    for got, edits in zip(response.variants, ([red(2.0)], [red(16.0)], []), strict=True):
        want = alone(edits)
        assert ids(got.completion) == [t.id for t in want.steered.tokens]
        assert logprobs(got.completion) == pytest.approx([t.logprob for t in want.steered.tokens], abs=2e-4)
        assert got.risk.score == pytest.approx(want.risk_final.probability, abs=1e-4)
        assert [list(e.latents) for e in got.plan.edits] == [[RED]] * len(edits)  # the label resolved, as run
    assert ids(response.variants[2].completion) == ids(response.default_completion)  # the empty variant is the unsteered twin
    assert len({tuple(ids(v.completion)) for v in response.variants}) > 1  # the sweep changed something


def test_a_stream_yields_the_plan_tokens_and_its_final_message_the_variants(client):
    options = dict(edits=[edit(LM_SAE, "set", "color:red", value=8.0)], variants=[plan([edit(LM_SAE, "ablate", RED)])],
                   generation=greedy(5), seed=0)
    messages = list(client.stream(LM, PROMPT, **options))
    unary = client.generate(LM, PROMPT, **options)
    assert [m.token.id for m in messages if m.HasField("token")] == ids(unary.completion)
    final = messages[-1].final
    assert [ids(v.completion) for v in final.variants] == [ids(v.completion) for v in unary.variants] and len(final.variants) == 1
    assert [list(e.latents) for e in final.plan.edits] == [[RED]]


def test_project_set_and_project_cap_equal_the_hand_formula(client, hand):
    u = hand.unit(RED)

    def project(v: float, cap: bool):
        def fn(x, _):
            c = x @ u
            target = torch.minimum(c, torch.tensor(v)) if cap else torch.full_like(c, v)
            return x + (target - c).unsqueeze(-1) * u
        return fn

    for op, v, cap in (("project_set", 3.0, False), ("project_cap", -0.2, True)):
        response = client.generate(LM, PROMPT, edits=[edit(LM_SAE, op, "color:red", value=v)], generation=greedy(8), seed=0,
                                   include_default=True, return_logprobs=1)
        assert_matches(response.completion, hand.generate(PROMPT, 8, project(v, cap)))
        assert_matches(response.default_completion, hand.generate(PROMPT, 8))
        assert response.steered


def split_threshold(values: torch.Tensor, margin: float = 1e-3) -> float | None:
    """A threshold with values on both sides, at least ``margin`` from each value."""
    ordered = sorted(float(v) for v in values)
    gaps = [(b - a, (a + b) / 2) for a, b in zip(ordered, ordered[1:])]
    best = max(gaps, default=(0.0, None))
    return best[1] if best[0] > 2 * margin else None


def test_a_conditional_clamp_edits_exactly_where_the_condition_holds(client, hand):
    f = hand.encode(hand.site_activations(hand.ids(PROMPT)))
    gate, threshold = next((j, t) for j in range(f.shape[1]) if j != RED and (t := split_threshold(f[:, j])) is not None)
    value = 20.0

    def conditional(x, _):
        fx = hand.encode(x)
        holds = (fx[:, gate] > threshold).float()
        return x + (holds * (value - fx[:, RED])).unsqueeze(-1) * hand.W_dec[RED]

    def everywhere(x, _):
        return x + (value - hand.encode(x)[:, RED]).unsqueeze(-1) * hand.W_dec[RED]

    condition = when(LM_SAE, gate, above=threshold)
    response = client.generate(LM, PROMPT, edits=[edit(LM_SAE, "set", "color:red", value=value, condition=condition)],
                               generation=greedy(8), seed=0, return_logprobs=1)
    expected = hand.generate(PROMPT, 8, conditional)
    assert_matches(response.completion, expected)
    assert expected[1] != pytest.approx(hand.generate(PROMPT, 8, everywhere)[1], abs=1e-3)  # the condition mattered
    # the same through an OR node whose other branch never holds
    never = when(LM_SAE, gate, below=-1.0)  # ReLU latents are >= 0
    response = client.generate(LM, PROMPT, edits=[edit(LM_SAE, "set", "color:red", value=value, condition=any_of(condition, never))],
                               generation=greedy(8), seed=0, return_logprobs=1)
    assert_matches(response.completion, expected)


def test_inline_declared_and_normalized_vectors_equal_the_hand_formula(client, hand):
    d = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(9))
    cases = [
        (vector(values=d.tolist(), site=LM_HOOK, value=1.5), lambda x, _: x + 1.5 * d),
        (vector(values=d.tolist(), site=LM_HOOK, value=0.5, normalize=True), lambda x, _: x + 0.5 * x.norm(dim=-1, keepdim=True) * d / d.norm()),
        (vector(LM_VECTOR, value=2.0), lambda x, _: x + 2.0 * hand.vector),
        (vector(values=d.tolist(), site=LM_HOOK, op="project_set", value=0.0),
         lambda x, _: x - (x @ (d / d.norm())).unsqueeze(-1) * (d / d.norm())),
    ]
    for n, (vec, formula) in enumerate(cases):
        response = client.generate(LM, PROMPT, vectors=[vec], generation=greedy(8), seed=0, return_logprobs=1)
        assert_matches(response.completion, hand.generate(PROMPT, 8, formula))
        assert response.steered, n
    # the declared vector through a preset is the same edit
    preset = client.generate(LM, PROMPT, presets=["shifted"], generation=greedy(8), seed=0, return_logprobs=1)
    assert_matches(preset.completion, hand.generate(PROMPT, 8, cases[2][1]))
    # at one site, latent edits come first and the vector acts on their result
    both = client.generate(LM, PROMPT, edits=[edit(LM_SAE, "set", "color:red", value=5.0)], vectors=[cases[0][0]],
                           generation=greedy(8), seed=0, return_logprobs=1)
    assert_matches(both.completion, hand.generate(
        PROMPT, 8, lambda x, _: x + (5.0 - hand.encode(x)[:, RED]).unsqueeze(-1) * hand.W_dec[RED] + 1.5 * d))


def test_a_preset_by_name_equals_its_edits_sent_inline_and_the_plan_shows_them(client, lm_backend):
    response = client.generate(LM, PROMPT, presets=["red"], edits=[edit(LM_SAE, "ablate", 5)], generation=greedy(6), seed=0)
    inline = client.generate(LM, PROMPT, edits=[edit(LM_SAE, "set", "color:red", value=8.0), edit(LM_SAE, "ablate", 5)],
                             generation=greedy(6), seed=0)
    request = rt.TextRequest(prompt=PROMPT, sampling=rt.SamplingParams(max_new_tokens=6, seed=0), plan=InterventionPlan(
        edits=(LatentEdit(LM_SAE, EditOp.SET, latents=(RED,), value=8.0), LatentEdit(LM_SAE, EditOp.ABLATE, latents=(5,)))))
    with one_thread():
        (expected,) = lm_backend.generate([lm_backend.validate(request)])
    assert ids(response.completion) == ids(inline.completion) == [t.id for t in expected.steered.tokens]
    assert [(e.op, list(e.latents), e.value) for e in response.plan.edits] == [(pb.EDIT_OP_SET, [RED], 8.0), (pb.EDIT_OP_ABLATE, [5], 0.0)]
    assert not response.plan.presets and response.steered


def test_stop_when_ends_the_request_at_the_first_position_where_it_holds(client, hand):
    n = 12
    tokens, _ = hand.generate(PROMPT, n)
    assert len(tokens) == n  # no eos: every position below is generated
    seq = hand.ids(PROMPT) + tokens
    f = hand.encode(hand.site_activations(seq))
    # latents at the position of generated token j (read when that token is input to the model)
    at = f[len(hand.ids(PROMPT)):len(seq)]

    def first_rise():
        for latent in range(f.shape[1]):
            for k in range(1, n):
                before = float(at[:k, latent].max())
                if float(at[k, latent]) > before + 2e-3:
                    return latent, k, (before + float(at[k, latent])) / 2
        raise AssertionError("no latent rises above its earlier values")

    latent, k, threshold = first_rise()
    response = client.generate(LM, PROMPT, stop_when=when(LM_SAE, latent, above=threshold), generation=greedy(n), seed=0,
                               include_default=True)
    assert response.completion.finish_reason == "condition"
    hit = response.completion.stopped_by
    assert (hit.position, hit.sae, hit.latent) == (k, LM_SAE, latent)
    assert hit.value == pytest.approx(float(at[k, latent]), abs=1e-4)
    assert ids(response.completion) == tokens[:k + 1]  # the token where it held is the last one kept
    assert ids(response.default_completion) == tokens and response.default_completion.finish_reason == "length"
    assert not response.steered  # stop_when only reads


def test_compute_steering_vector_equals_a_hand_diffmean(client, hand):
    positive, negative = ["the red cat", "a red dog runs fast"], ["the blue cat", "blue"]
    response = client.compute_steering_vector(LM, positive, negative, sae=LM_SAE, top_n=3)

    def stacked(prompts):
        return torch.cat([hand.site_activations(hand.ids(p)) for p in prompts])

    pos, neg = stacked(positive), stacked(negative)
    direction = pos.mean(0) - neg.mean(0)
    assert response.site == LM_HOOK and response.sae == LM_SAE
    assert (response.n_positive_tokens, response.n_negative_tokens) == (pos.shape[0], neg.shape[0])
    assert list(response.values) == pytest.approx(direction.tolist(), abs=1e-4)
    cosine = (hand.W_dec @ direction) / (hand.W_dec.norm(dim=-1) * direction.norm())
    top = cosine.topk(3)
    labels = {i: name for name, i in LM_LABELS.items()}
    assert [m.latent for m in response.closest] == top.indices.tolist()
    assert [m.cosine for m in response.closest] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [m.label for m in response.closest] == [labels.get(i, "") for i in top.indices.tolist()]
    # the site given by name, no SAE: the same vector, no comparison
    by_site = client.compute_steering_vector(LM, positive, negative, site=LM_HOOK)
    assert list(by_site.values) == pytest.approx(list(response.values), abs=1e-6) and not by_site.closest
    # and the vector steers when sent back inline
    steered = client.generate(LM, PROMPT, vectors=[vector(values=response.values, site=response.site, value=3.0)],
                              generation=greedy(6), seed=0, return_logprobs=1)
    assert_matches(steered.completion, hand.generate(PROMPT, 6, lambda x, _: x + 3.0 * direction))


def test_describe_returns_the_latents_it_chose(client):
    response = client.generate(LM, PROMPT, edits=[edit(LM_SAE, "set", describe="red", value=8.0)], generation=greedy(6), seed=0)
    (chosen,) = response.plan.edits
    assert list(chosen.latents) == [RED] and not chosen.labels
    by_index = client.generate(LM, PROMPT, edits=[edit(LM_SAE, "set", RED, value=8.0)], generation=greedy(6), seed=0)
    assert ids(response.completion) == ids(by_index.completion)


def rpc_error(call) -> SteeringError:
    with pytest.raises(SteeringError) as err:
        call()
    return err.value


def test_a_vector_of_the_wrong_width_is_invalid_argument(client):
    err = rpc_error(lambda: client.generate(LM, "the", vectors=[vector(values=[1.0] * (D_MODEL - 1), site=LM_HOOK)], generation=greedy(2)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field.startswith("plan.vectors[0]")


def test_oversize_inline_vectors_and_too_many_variants_are_resource_exhausted(client):
    cap = LM_LIMITS["max_inline_vector_dims"]
    vectors = [vector(values=[0.0] * D_MODEL, site=LM_HOOK)] * (cap // D_MODEL + 1)
    err = rpc_error(lambda: client.generate(LM, "the", vectors=vectors, generation=greedy(2)))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.field == f"plan.vectors[{cap // D_MODEL}].values"
    assert err.quota_violations and str(cap) in err.quota_violations[0][1]
    too_many = [pb.InterventionPlan()] * (LM_LIMITS["max_variants"] + 1)
    err = rpc_error(lambda: client.generate(LM, "the", variants=too_many, generation=greedy(2)))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.field == "variants"


def test_malformed_conditions_over_the_wire_are_invalid_argument(client):
    node = pb.Condition(sae=LM_SAE, all_of=[when(LM_SAE, 1, above=0.0)])
    err = rpc_error(lambda: client.generate(LM, "the", edits=[edit(LM_SAE, "set", 3, condition=node)], generation=greedy(2)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "plan.edits[0].condition.sae"
    err = rpc_error(lambda: client.generate(LM, "the", variants=[plan(stop_when=_deep(5))], generation=greedy(2)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field.startswith("variants[0].stop_when.all_of[0]")


def test_an_unknown_preset_is_not_found(client):
    err = rpc_error(lambda: client.generate(LM, "the", presets=["no-such-preset"], generation=greedy(2)))
    assert err.code == grpc.StatusCode.NOT_FOUND and err.field == "plan.presets[0]"


def test_compute_steering_vector_checks_its_prompt_sets(client):
    limit = LM_LIMITS["max_vector_prompts"]
    err = rpc_error(lambda: client.compute_steering_vector(LM, [], ["the"], site=LM_HOOK))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "positive"
    err = rpc_error(lambda: client.compute_steering_vector(LM, ["the"], ["a"] * (limit + 1), site=LM_HOOK))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.field == "negative"
    err = rpc_error(lambda: client.compute_steering_vector(LM, ["the", ""], ["a"], site=LM_HOOK))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "positive[1]"
    err = rpc_error(lambda: client.compute_steering_vector(LM, ["the"], ["a"], sae="nope"))
    assert err.code == grpc.StatusCode.NOT_FOUND and err.field == "sae"
    err = rpc_error(lambda: client.compute_steering_vector("img", ["the"], ["a"], site=LM_HOOK))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "model"


def test_the_http_mirror_computes_the_same_vector(service, client):
    body = {"model": LM, "positive": ["the red cat"], "negative": ["the blue cat"], "sae": LM_SAE, "topN": 2}
    reply = requests.post(service.http_url + "/v1/steering/ComputeSteeringVector", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    got = json_format.ParseDict(reply.json(), pb.ComputeSteeringVectorResponse())
    want = client.compute_steering_vector(LM, ["the red cat"], ["the blue cat"], sae=LM_SAE, top_n=2)
    assert list(got.values) == pytest.approx(list(want.values), abs=1e-6)
    assert [m.latent for m in got.closest] == [m.latent for m in want.closest]
    bad = requests.post(service.http_url + "/v1/steering/ComputeSteeringVector", json={**body, "positive": []}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "positive"


@pytest.fixture
def run(service, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")

    def run(*args: str) -> tuple[int, str]:
        code = cli.main(["--target", service.target, *args])
        return code, capsys.readouterr().out

    return run


def test_cli_computes_a_vector_writes_it_and_steers_with_it(run, client, tmp_path):
    out = tmp_path / "red.json"
    code, text = run("steering-vector", "--model", LM, "--sae", LM_SAE, "--positive", "the red cat", "--negative", "the blue cat",
                     "--top-n", "2", "--out", str(out))
    assert code == 0, text
    want = client.compute_steering_vector(LM, ["the red cat"], ["the blue cat"], sae=LM_SAE, top_n=2)
    saved = json.loads(out.read_text())
    assert saved["site"] == LM_HOOK and saved["values"] == pytest.approx(list(want.values), abs=1e-6)
    assert LM_HOOK in text and str(want.closest[0].latent) in text
    code, text = run("generate", "--model", LM, "--vector-file", f"{out}=3", "--max-new-tokens", "4", "--json", PROMPT)
    assert code == 0, text
    expected = client.generate(LM, PROMPT, vectors=[vector(values=want.values, site=want.site, value=3.0)], generation=greedy(4), seed=0)
    assert json.loads(text)["completion"]["text"] == expected.completion.text


def test_cli_presets_variants_and_stop_when(run, client):
    variant = json.dumps({"edits": [{"sae": LM_SAE, "op": "EDIT_OP_ABLATE", "latents": [RED]}]})
    code, text = run("generate", "--model", LM, "--preset", "red", "--variant", variant, "--stop-when", "animal:cat>1000",
                     "--max-new-tokens", "4", "--json", PROMPT)
    assert code == 0, text
    got = json.loads(text)
    expected = client.generate(LM, PROMPT, presets=["red"], stop_when=when(LM_SAE, "animal:cat", above=1000.0),
                               variants=[plan([edit(LM_SAE, "ablate", RED)])], generation=greedy(4), seed=0)
    assert got["completion"]["text"] == expected.completion.text
    assert [v["completion"]["text"] for v in got["variants"]] == [v.completion.text for v in expected.variants]
    code, text = run("list-models")
    assert code == 0 and "red" in text and f"{LM_VECTOR} @ {LM_HOOK}" in text
    code, text = run("generate", "--model", LM, "--stop-when", "animal:cat=3", PROMPT)
    assert code == 2 and "LATENT>VALUE" in text


def test_semantic_search_returns_scores_and_substring_search_does_not(client):
    substring = client.search_features(LM, "red", semantic=False)
    assert [(f.index, f.label, f.score) for f in substring] == [(RED, "color:red", 1.0)]
    default = client.search_features(LM, "red")
    assert default and default[0].label == "color:red"
    assert all(a.score >= b.score for a, b in zip(default, default[1:]))


def test_errors_keep_their_library_type():
    # conversion errors are the library's typed errors, which services/errors.py maps to statuses
    for case in MALFORMED.values():
        with pytest.raises(SaeRuntimeError):
            convert.plan_from_proto(case[0])
