"""Every RPC end to end through the real Ray Serve gRPC proxy, checked against the library.

The reference for each response is the same model loaded in the test process through the library
(``build_backend`` + ``validate`` + ``generate``/``encode``), with requests built by hand (not by
``services.convert``), so a wrong conversion anywhere on the wire path shows up as a mismatch.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from steering.v1 import steering_pb2 as pb

from sae_runtime.backends import types as rt
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, VisionScope
from services.client import Generation, SteeringError, edit
from tests.services.helpers import (
    IMAGE,
    IMG_HOOK,
    IMG_LABELS,
    IMG_SAE,
    LM,
    LM_HOOK,
    LM_LABELS,
    LM_SAE,
    SERVED_MODELS,
    VLM,
    VLM_HOOK,
    VLM_LABELS,
    VLM_SAE,
    one_thread,
    png_bytes,
)

STEERING_METHODS = {"Generate", "GenerateStream", "GenerateMultimodal", "GenerateImage", "Encode", "ListModels", "SearchFeatures", "EvaluateSae",
                    "ComputeSteeringVector"}


def ids(completion) -> list[int]:
    return [t.id for t in completion.tokens]


def latents(items) -> list[tuple[int, str]]:
    return [(a.index, a.label or "") for a in items]


# -- health and reflection ----------------------------------------------------------------------


def test_health_check_list_and_watch(service, client):
    assert client.health() == "SERVING"
    assert client.health("steering.v1.Steering") == "SERVING"
    assert client.health(LM) == "SERVING" and client.health(IMAGE) == "SERVING"
    with pytest.raises(SteeringError) as err:
        client.health("no.such.Service")
    assert err.value.code == grpc.StatusCode.NOT_FOUND

    with grpc.insecure_channel(service.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = stub.List(health_pb2.HealthListRequest(), timeout=30).statuses
        assert set(statuses) == {"", "steering.v1.Steering", *SERVED_MODELS}
        assert {s.status for s in statuses.values()} == {health_pb2.HealthCheckResponse.SERVING}
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()  # the stream stays open for changes until the client leaves
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        (unknown,) = list(stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30))
        assert unknown.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_server_reflection_describes_the_api(service):
    with grpc.insecure_channel(service.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"steering.v1.Steering", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        steering = pool.FindServiceByName("steering.v1.Steering")
        assert {m.name for m in steering.methods} == STEERING_METHODS
        stream = steering.methods_by_name["GenerateStream"]
        assert stream.server_streaming and stream.output_type.full_name == "steering.v1.GenerateStreamResponse"
        assert "mitigate_risk_top_n" in pool.FindMessageTypeByName("steering.v1.GenerateRequest").fields_by_name


# -- models and features ------------------------------------------------------------------------


def test_list_models_describes_models_and_saes(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == set(SERVED_MODELS)
    lm, img, vlm = models[LM], models[IMAGE], models[VLM]
    assert (lm.kind, lm.description, lm.has_risk_probe) == ("causal_lm", "tiny random llama", True)
    (sae,) = lm.saes
    assert (sae.name, sae.hook_name, sae.architecture, sae.d_in, sae.width, sae.has_labels) == (
        LM_SAE, LM_HOOK, "standard", 32, 64, True
    )
    assert (img.kind, img.has_risk_probe) == ("sdxl_turbo", False)
    (isae,) = img.saes
    assert (isae.name, isae.hook_name, isae.d_in, isae.width, isae.has_labels) == (IMG_SAE, IMG_HOOK, 64, 128, True)
    assert vlm.kind == "llava" and [(v.name, v.hook_name, v.width) for v in vlm.saes] == [(VLM_SAE, VLM_HOOK, 64)]


def test_search_features_by_label_substring_and_index(client):
    colors = client.search_features(LM, "color")
    assert [(f.sae, f.index, f.label) for f in colors] == [(LM_SAE, 3, "color:red"), (LM_SAE, 5, "color:blue")]
    assert [(f.index, f.label) for f in client.search_features(LM, "CAT")] == [(9, "animal:cat")]
    everything = client.search_features(LM, limit=100)
    assert {f.label: f.index for f in everything} == LM_LABELS
    assert [f.index for f in client.search_features(LM, limit=2)] == sorted(LM_LABELS.values())[:2]
    assert [(f.index, f.label) for f in client.search_features(LM, index=17)] == [(17, "animal:dog")]
    assert [(f.index, f.label) for f in client.search_features(LM, index=18)] == [(18, "")]  # unlabelled latent
    assert {f.label for f in client.search_features(IMAGE, "", sae=IMG_SAE)} == set(IMG_LABELS)


# -- text generation ----------------------------------------------------------------------------


def reference_request(prompt: str, edits, *, max_new_tokens: int, seed: int | None, **kw) -> rt.TextRequest:
    return rt.TextRequest(
        prompt=prompt,
        plan=InterventionPlan(edits=tuple(edits)),
        sampling=rt.SamplingParams(max_new_tokens=max_new_tokens, seed=seed, temperature=kw.pop("temperature", 0.0)),
        **kw,
    )


def test_generate_equals_the_library_result(client, lm_backend):
    response = client.generate(
        LM,
        "the red cat",
        edits=[edit(LM_SAE, "set", "animal:cat", value=12.0), edit(LM_SAE, "ablate", 5)],
        generation=Generation(max_new_tokens=8),
        seed=3,
        include_default=True,
        return_latents=True,
        latents_top_k=4,
        return_logprobs=2,
    )
    reference = reference_request(
        "the red cat",
        [LatentEdit(LM_SAE, EditOp.SET, labels=("animal:cat",), value=12.0), LatentEdit(LM_SAE, EditOp.ABLATE, latents=(5,))],
        max_new_tokens=8,
        seed=3,
        include_default=True,
        readout=ReadoutSpec((LM_SAE,), 4),
        logprobs=2,
    )
    with one_thread():
        (expected,) = lm_backend.generate([lm_backend.validate(reference)])

    assert response.steered
    assert response.completion.text == expected.steered.text
    assert ids(response.completion) == [t.id for t in expected.steered.tokens]
    assert response.completion.finish_reason == expected.steered.finish_reason
    assert ids(response.default_completion) == [t.id for t in expected.default.tokens]
    assert ids(response.completion) != ids(response.default_completion)  # the clamp changed the output
    for got, want in zip(response.completion.tokens, expected.steered.tokens):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [s for s, _ in want.top_logprobs]
        assert latents(got.latents[0].after) == [(a.index, a.label or "") for a in want.latents[0].after]
    assert len(response.prompt_latents) == len(expected.prompt_latents)
    for got, want in zip(response.prompt_latents, expected.prompt_latents):
        assert latents(got.saes[0].before) == [(a.index, a.label or "") for a in want[0].before]
        assert latents(got.saes[0].after) == [(a.index, a.label or "") for a in want[0].after]
    # the clamped latent shows up, with its label, after the edit at every prompt position
    assert all((LM_LABELS["animal:cat"], "animal:cat") in latents(p.saes[0].after) for p in response.prompt_latents)
    (pooled,) = response.pooled
    assert latents(pooled.top_mean) == [(a.index, a.label or "") for a in expected.pooled[0].top_mean]
    assert response.risk.score == pytest.approx(expected.risk_final.probability, abs=1e-4)
    assert response.risk_prompt.score == pytest.approx(expected.risk_prompt.probability, abs=1e-4)
    assert [(c.latent, c.label) for c in response.risk.top_concepts] == [
        (c.latent, c.label or "") for c in expected.risk_final.contributions
    ]
    t = response.timings
    assert t.compute_ms > 0 and t.queue_ms >= 0 and t.total_ms >= t.compute_ms and t.batch_size >= 1
    v = response.versions
    assert v.model == LM and v.model_version and v.saes[LM_SAE] and v.risk_probe


def test_unsteered_request_is_marked_and_matches_library(client, lm_backend):
    response = client.generate(LM, "the dog", generation=Generation(max_new_tokens=5, temperature=0.9), seed=11)
    with one_thread():
        (expected,) = lm_backend.generate(
            [lm_backend.validate(reference_request("the dog", [], max_new_tokens=5, seed=11, temperature=0.9))]
        )
    assert not response.steered
    assert ids(response.completion) == [t.id for t in expected.steered.tokens]
    assert not response.HasField("default_completion") and not response.prompt_latents


def test_stream_yields_the_unary_tokens_with_running_risk(client):
    options = dict(edits=[edit(LM_SAE, "add", "color:blue", value=6.0)], generation=Generation(max_new_tokens=6), seed=1)
    messages = list(client.stream(LM, "the sky", **options))
    unary = client.generate(LM, "the sky", **options)
    tokens = [m.token for m in messages if m.HasField("token")]
    assert [t.id for t in tokens] == ids(unary.completion) and len(tokens) >= 1
    assert all(m.HasField("running_risk") and 0.0 <= m.running_risk <= 1.0 for m in messages if m.HasField("token"))
    assert sum(m.HasField("final") for m in messages) == 1 and messages[-1].HasField("final")
    final = messages[-1].final
    assert final.completion.text == unary.completion.text
    assert final.risk.score == pytest.approx(unary.risk.score, abs=1e-5)
    assert final.steered and final.timings.compute_ms > 0


def test_encode_equals_the_library_result(client, lm_backend):
    response = client.encode(LM, "the red cat", top_k=3)
    with one_thread():
        expected = lm_backend.encode(lm_backend.validate(rt.EncodeRequest(text="the red cat", saes=(LM_SAE,), top_k=3)))
    assert list(response.tokens) == list(expected.tokens)
    assert [p.token for p in response.latents] == list(expected.tokens)
    for got, want in zip(response.latents, expected.latents, strict=True):
        assert latents(got.saes[0].before) == [(a.index, a.label or "") for a in want[0].before]
        assert [a.value for a in got.saes[0].before] == pytest.approx([a.value for a in want[0].before], abs=1e-4)
    assert response.risk.score == pytest.approx(expected.risk.probability, abs=1e-4)
    assert response.versions.model == LM


def test_evaluate_sae_equals_the_library_result_and_respects_the_limits(service, lm_backend):
    from steering.v1 import steering_pb2_grpc

    from sae_runtime.evaluate import evaluate_backend_sae

    texts = ["the red cat", "a dog runs"]
    with grpc.insecure_channel(service.target) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)
        response = stub.EvaluateSae(pb.EvaluateSaeRequest(model=LM, sae=LM_SAE, texts=texts), timeout=120)
        with pytest.raises(grpc.RpcError) as err:
            stub.EvaluateSae(pb.EvaluateSaeRequest(model=LM, sae=LM_SAE, texts=["a"] * 17), timeout=120)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "texts" in err.value.details()
    with one_thread():
        expected = evaluate_backend_sae(lm_backend, LM_SAE, texts)
    assert (response.n_tokens, response.l0) == (expected.n_tokens, pytest.approx(expected.l0))
    assert response.fvu == pytest.approx(expected.fvu, rel=1e-4)
    assert response.loss_recovered == pytest.approx(expected.loss_recovered, rel=1e-4, abs=1e-6)
    assert response.versions.model == LM


# -- images -------------------------------------------------------------------------------------


def pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_generate_image_equals_the_library_result(client, image_backend):
    response = client.generate_image(
        IMAGE,
        "a red cat",
        edits=[edit(IMG_SAE, "add", "texture:fur", value=40.0)],
        num_inference_steps=1,
        seed=4,
        height=64,
        width=64,
        include_default=True,
        return_latents=True,
        latents_top_k=2,
    )
    reference = rt.ImageRequest(
        prompt="a red cat",
        num_inference_steps=1,
        seed=4,
        height=64,
        width=64,
        plan=InterventionPlan(edits=(LatentEdit(IMG_SAE, EditOp.ADD, labels=("texture:fur",), value=40.0),)),
        readout=ReadoutSpec((IMG_SAE,), 2),
        include_default=True,
    )
    with one_thread():
        (expected,) = image_backend.generate_images([image_backend.validate(reference)])
    steered, default = pixels(response.png), pixels(response.default_png)
    assert steered.shape == (64, 64, 3)
    assert np.abs(steered - pixels(expected.png)).max() <= 1
    assert np.abs(default - pixels(expected.default_png)).max() <= 1
    assert np.abs(steered - default).max() > 1  # the edit changed the image
    assert [(m.sae, m.latent, m.label) for m in response.latent_maps] == [
        (m.sae, m.latent, m.label or "") for m in expected.latent_maps
    ]
    for m in response.latent_maps:
        assert len(m.values) == m.height * m.width > 0 and m.heatmap_png[:4] == b"\x89PNG"
    assert response.steered and response.versions.saes[IMG_SAE]


# -- multimodal ---------------------------------------------------------------------------------


def test_generate_multimodal_equals_the_library_result(client, vlm_backend):
    image = png_bytes(7)
    request = client.text_request(
        VLM,
        "what is this",
        image=image,
        edits=[edit(VLM_SAE, "set", "shape:round", value=10.0)],
        generation=Generation(max_new_tokens=6),
        seed=2,
        include_default=True,
        return_latents=True,
        latents_top_k=3,
    )
    request.plan.scope.vision = pb.VISION_SCOPE_CLS
    response = client._call(client._stub.GenerateMultimodal, request)
    reference = rt.TextRequest(
        prompt="what is this",
        image=image,
        plan=InterventionPlan(edits=(LatentEdit(VLM_SAE, EditOp.SET, labels=("shape:round",), value=10.0),),
                              scope=Scope(vision=VisionScope.CLS)),
        sampling=rt.SamplingParams(max_new_tokens=6, seed=2),
        include_default=True,
        readout=ReadoutSpec((VLM_SAE,), 3),
    )
    with one_thread():
        (expected,) = vlm_backend.generate([vlm_backend.validate(reference)])
    assert ids(response.completion) == [t.id for t in expected.steered.tokens]
    assert ids(response.default_completion) == [t.id for t in expected.default.tokens]
    assert len(response.vision_latents) == len(expected.vision_latents) == 17  # CLS + 4 x 4 patches
    for got, want in zip(response.vision_latents, expected.vision_latents):
        assert latents(got.saes[0].after) == [(a.index, a.label or "") for a in want[0].after]
    # the clamp applies to the CLS position only
    assert (VLM_LABELS["shape:round"], "shape:round") in latents(response.vision_latents[0].saes[0].after)
    assert [a.value for a in response.vision_latents[0].saes[0].after if a.index == VLM_LABELS["shape:round"]] == [10.0]
    assert response.steered and response.versions.model == VLM


def test_encode_an_image_equals_the_library_result(client, vlm_backend):
    image = png_bytes(3)
    response = client.encode(VLM, "a picture", image=image, top_k=2)
    with one_thread():
        expected = vlm_backend.encode(vlm_backend.validate(rt.EncodeRequest(text="a picture", image=image, saes=(VLM_SAE,), top_k=2)))
    assert list(response.tokens) == list(expected.tokens)
    assert len(response.vision_latents) == len(expected.vision_latents) == 17
    for got, want in zip(response.vision_latents, expected.vision_latents):
        assert latents(got.saes[0].before) == [(a.index, a.label or "") for a in want[0].before]


def test_multimodal_on_a_text_only_model_names_the_model_field(client):
    with pytest.raises(SteeringError) as err:
        client.generate_multimodal(LM, b"\x89PNG not really", "what is this?")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "model"
