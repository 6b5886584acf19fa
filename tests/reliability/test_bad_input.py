"""The bad-input matrix, through the real gRPC proxy: for every RPC, wrong or out-of-range values in
each field get their documented status (steering.proto's header: NOT_FOUND, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) with details naming the field; a good request of the same
RPC right after still succeeds; and no replica logs an exception that did not become its status."""

from __future__ import annotations

import math
import struct
import time
import zlib

import grpc
import pytest
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services.client import Generation, SteeringClient, edit, plan
from tests.reliability.support import CHANNEL_OPTIONS, RPCS, call, unexpected_tracebacks
from tests.services.helpers import IMAGE, IMG_SAE, LM, LM_LIMITS, LM_SAE, SERVED_MODELS, VLM, VLM_SAE, png_bytes

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

LM_WIDTH, VLM_WIDTH, IMG_WIDTH = 64, 64, 128  # d_sae of the session's SAEs
VLM_MAX_IMAGE_BYTES, VLM_MAX_SIDE, IMG_MAX_STEPS = 10_000, 64, 2  # tests/services/helpers.service_config


def text(model: str = LM, prompt: str = "the cat", edits=(), *, max_new_tokens: int | None = 2, **options) -> pb.GenerateRequest:
    options.setdefault("generation", Generation(max_new_tokens=max_new_tokens))
    return SteeringClient.text_request(model, prompt, edits=edits, **options)


def with_params(**params) -> pb.GenerateRequest:
    request = text()
    for name, value in params.items():
        setattr(request.params, name, value)
    return request


def multimodal(image: bytes, edits=(), *, model: str = VLM, max_new_tokens: int = 2) -> pb.GenerateMultimodalRequest:
    return SteeringClient.text_request(model, "what is it", edits=edits, image=image, generation=Generation(max_new_tokens=max_new_tokens))


def image(edits=(), *, model: str = IMAGE, steps: int | None = 1, **fields) -> pb.GenerateImageRequest:
    request = pb.GenerateImageRequest(model=model, prompt="a cat", seed=1, plan=plan(edits))
    if steps is not None:
        request.num_inference_steps = steps
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def image_with_scope(**scope) -> pb.GenerateImageRequest:
    request = image([edit(IMG_SAE, "add", 7, value=1.0)])
    for name, value in scope.items():
        if name == "mask":
            request.plan.scope.mask.CopyFrom(value)
        else:
            setattr(request.plan.scope, name, value)
    return request


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's header)
    followed by a tiny, wrong IDAT: only the header may be read before refusing it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def bad_edit_op(op: int) -> pb.GenerateRequest:
    return text(edits=[pb.LatentEdit(sae=LM_SAE, op=op, latents=[1], value=1.0)])


def thousands_of_edits(sae: str, width: int, n: int = 3000) -> list[pb.LatentEdit]:
    return [edit(sae, "set", i % width, value=1.0) for i in range(n)]


# name -> (rpc, request, expected status, field named in the details)
CASES: dict[str, tuple[str, object, grpc.StatusCode, str | None]] = {
    # -- Generate ---------------------------------------------------------------------------------
    "generate: unknown model": ("Generate", text("no-such-model"), NOT_FOUND, "model"),
    "generate: no model": ("Generate", text(""), INVALID, "model"),
    "generate: unknown SAE": ("Generate", text(edits=[edit("nope", "set", 1, value=1.0)]), NOT_FOUND, "plan.edits[0].sae"),
    "generate: unknown label": ("Generate", text(edits=[edit(LM_SAE, "set", "color:purple", value=1.0)]), NOT_FOUND, "plan.edits[0].labels"),
    "generate: latent -1": ("Generate", text(edits=[edit(LM_SAE, "set", -1, value=1.0)]), INVALID, "plan.edits[0].latents"),
    "generate: latent d_sae": ("Generate", text(edits=[edit(LM_SAE, "ablate", 3), edit(LM_SAE, "set", LM_WIDTH, value=1.0)]), INVALID, "plan.edits[1].latents"),
    "generate: latent 2**63-1": ("Generate", text(edits=[edit(LM_SAE, "cap", 2**63 - 1, value=1.0)]), INVALID, "plan.edits[0].latents"),
    "generate: edit value NaN": ("Generate", text(edits=[edit(LM_SAE, "set", 1, value=math.nan)]), INVALID, "plan.edits[0].value"),
    "generate: edit value +inf": ("Generate", text(edits=[edit(LM_SAE, "add", 1, value=math.inf)]), INVALID, "plan.edits[0].value"),
    "generate: edit value -inf": ("Generate", text(edits=[edit(LM_SAE, "scale", 1, value=-math.inf)]), INVALID, "plan.edits[0].value"),
    "generate: edit names no latent": ("Generate", text(edits=[edit(LM_SAE, "set", value=1.0)]), INVALID, "plan.edits[0].latents"),
    "generate: unspecified op": ("Generate", bad_edit_op(pb.EDIT_OP_UNSPECIFIED), INVALID, "plan.edits[0].op"),
    "generate: unknown op 99": ("Generate", bad_edit_op(99), INVALID, "plan.edits[0].op"),
    "generate: normalize on set": ("Generate", text(edits=[edit(LM_SAE, "set", 1, value=1.0, normalize=True)]), INVALID, "plan.edits[0].normalize"),
    "generate: unknown token scope": ("Generate", text(intervention=pb.InterventionPlan(scope=pb.Scope(tokens=7))), INVALID, "plan.scope.tokens"),
    "generate: thousands of edits": ("Generate", text(edits=thousands_of_edits(LM_SAE, LM_WIDTH)), EXHAUSTED, "plan.edits"),
    "generate: empty prompt": ("Generate", text(prompt=""), INVALID, "prompt"),
    "generate: over-long prompt": ("Generate", text(prompt="the " * (LM_LIMITS["max_prompt_tokens"] + 1)), EXHAUSTED, "prompt"),
    "generate: huge prompt (1 MB)": ("Generate", text(prompt="the " * 250_000), EXHAUSTED, "prompt"),
    "generate: prompt and messages": ("Generate", text(messages=[("user", "hi")]), INVALID, "messages"),
    "generate: message without role": ("Generate", text(prompt="", messages=[("", "hi")]), INVALID, "messages[0].role"),
    "generate: max_new_tokens above the cap": ("Generate", text(max_new_tokens=LM_LIMITS["max_new_tokens"] + 1), EXHAUSTED, "params.max_new_tokens"),
    "generate: max_new_tokens 2**31-1": ("Generate", text(max_new_tokens=2**31 - 1), EXHAUSTED, "params.max_new_tokens"),
    "generate: max_new_tokens 0": ("Generate", text(max_new_tokens=0), INVALID, "params.max_new_tokens"),
    "generate: max_new_tokens -5": ("Generate", text(max_new_tokens=-5), INVALID, "params.max_new_tokens"),
    "generate: temperature NaN": ("Generate", with_params(temperature=math.nan), INVALID, "params.temperature"),
    "generate: temperature -1": ("Generate", with_params(temperature=-1.0), INVALID, "params.temperature"),
    "generate: top_p +inf": ("Generate", with_params(top_p=math.inf), INVALID, "params.top_p"),
    "generate: top_p 0": ("Generate", with_params(top_p=0.0), INVALID, "params.top_p"),
    "generate: top_k -1": ("Generate", with_params(top_k=-1), INVALID, "params.top_k"),
    "generate: repetition_penalty -inf": ("Generate", with_params(repetition_penalty=-math.inf), INVALID, "params.repetition_penalty"),
    "generate: frequency_penalty NaN": ("Generate", with_params(frequency_penalty=math.nan), INVALID, "params.frequency_penalty"),
    "generate: empty stop string": ("Generate", text(generation=Generation(max_new_tokens=2, stop=("",))), INVALID, "params.stop[0]"),
    "generate: vision scope on a causal LM": ("Generate", text(intervention=pb.InterventionPlan(scope=pb.Scope(vision=pb.VISION_SCOPE_CLS))), INVALID, "plan.scope.vision"),
    "generate: mask on a causal LM": ("Generate", text(intervention=pb.InterventionPlan(scope=pb.Scope(mask=pb.Mask(height=1, width=1, values=[1.0])))), INVALID, "plan.scope.mask"),
    "generate: step window on a causal LM": ("Generate", text(intervention=pb.InterventionPlan(scope=pb.Scope(step_end=1))), INVALID, "plan.scope.step_end"),
    "generate: readout of unknown SAE": ("Generate", text(return_latents=["zzz"]), NOT_FOUND, "return_latents.saes[0]"),
    "generate: readout top_k 100000": ("Generate", text(return_latents=True, latents_top_k=100_000), INVALID, "return_latents.top_k"),
    "generate: logprobs -1": ("Generate", text(return_logprobs=-1), INVALID, "return_logprobs"),
    "generate: logprobs 10000": ("Generate", text(return_logprobs=10_000), INVALID, "return_logprobs"),
    "generate: mitigate_risk_top_n -3": ("Generate", text(mitigate_risk_top_n=-3), INVALID, "mitigate_risk_top_n"),
    "generate: an image model": ("Generate", text(IMAGE), INVALID, "model"),
    "generate: deadline too short": ("Generate", text(max_new_tokens=LM_LIMITS["max_new_tokens"]), DEADLINE, None),
    # -- GenerateStream ---------------------------------------------------------------------------
    "stream: unknown model": ("GenerateStream", text("no-such-model"), NOT_FOUND, "model"),
    "stream: latent d_sae": ("GenerateStream", text(edits=[edit(LM_SAE, "set", LM_WIDTH, value=1.0)]), INVALID, "plan.edits[0].latents"),
    "stream: edit value NaN": ("GenerateStream", text(edits=[edit(LM_SAE, "set", 1, value=math.nan)]), INVALID, "plan.edits[0].value"),
    "stream: over-long prompt": ("GenerateStream", text(prompt="the " * 200), EXHAUSTED, "prompt"),
    "stream: max_new_tokens above the cap": ("GenerateStream", text(max_new_tokens=1000), EXHAUSTED, "params.max_new_tokens"),
    "stream: thousands of edits": ("GenerateStream", text(edits=thousands_of_edits(LM_SAE, LM_WIDTH)), EXHAUSTED, "plan.edits"),
    "stream: an image model": ("GenerateStream", text(IMAGE), INVALID, "model"),
    "stream: deadline too short": ("GenerateStream", text(max_new_tokens=LM_LIMITS["max_new_tokens"]), DEADLINE, None),
    # -- GenerateMultimodal -----------------------------------------------------------------------
    "multimodal: unknown model": ("GenerateMultimodal", multimodal(png_bytes(1), model="no-such-model"), NOT_FOUND, "model"),
    "multimodal: a text-only model": ("GenerateMultimodal", multimodal(png_bytes(1), model=LM), INVALID, "model"),
    "multimodal: empty image": ("GenerateMultimodal", multimodal(b""), INVALID, "image"),
    "multimodal: malformed image": ("GenerateMultimodal", multimodal(b"\x89PNG\r\n\x1a\n not really a png"), INVALID, "image"),
    "multimodal: truncated PNG": ("GenerateMultimodal", multimodal(png_bytes(2)[:60]), INVALID, "image"),
    "multimodal: a GIF": ("GenerateMultimodal", multimodal(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"), INVALID, "image"),
    "multimodal: oversized image bytes": ("GenerateMultimodal", multimodal(png_bytes(3, size=200)), EXHAUSTED, "image"),
    "multimodal: image side over the limit": ("GenerateMultimodal", multimodal(png_bytes(4, size=VLM_MAX_SIDE + 16)), EXHAUSTED, "image"),
    "multimodal: decompression-bomb header": ("GenerateMultimodal", multimodal(png_header_only(100_000, 100_000)), EXHAUSTED, "image"),
    "multimodal: vision latent d_sae": ("GenerateMultimodal", multimodal(png_bytes(1), [edit(VLM_SAE, "set", VLM_WIDTH, value=1.0)]), INVALID, "plan.edits[0].latents"),
    "multimodal: edit value -inf": ("GenerateMultimodal", multimodal(png_bytes(1), [edit(VLM_SAE, "add", 1, value=-math.inf)]), INVALID, "plan.edits[0].value"),
    "multimodal: max_new_tokens above the cap": ("GenerateMultimodal", multimodal(png_bytes(1), max_new_tokens=17), EXHAUSTED, "params.max_new_tokens"),
    "multimodal: thousands of edits": ("GenerateMultimodal", multimodal(png_bytes(1), thousands_of_edits(VLM_SAE, VLM_WIDTH)), EXHAUSTED, "plan.edits"),
    # -- GenerateImage ----------------------------------------------------------------------------
    "image: unknown model": ("GenerateImage", image(model="no-such-model"), NOT_FOUND, "model"),
    "image: a text model": ("GenerateImage", image(model=LM), INVALID, "model"),
    "image: token scope on SDXL-Turbo": ("GenerateImage", image_with_scope(tokens=pb.TOKEN_SCOPE_PROMPT), INVALID, "plan.scope.tokens"),
    "image: vision scope on SDXL-Turbo": ("GenerateImage", image_with_scope(vision=pb.VISION_SCOPE_CLS), INVALID, "plan.scope.vision"),
    "image: unknown SAE": ("GenerateImage", image([edit("nope", "add", 1, value=1.0)]), NOT_FOUND, "plan.edits[0].sae"),
    "image: unknown label": ("GenerateImage", image([edit(IMG_SAE, "add", "color:purple", value=1.0)]), NOT_FOUND, "plan.edits[0].labels"),
    "image: latent -1": ("GenerateImage", image([edit(IMG_SAE, "add", -1, value=1.0)]), INVALID, "plan.edits[0].latents"),
    "image: latent d_sae": ("GenerateImage", image([edit(IMG_SAE, "add", IMG_WIDTH, value=1.0)]), INVALID, "plan.edits[0].latents"),
    "image: edit value +inf": ("GenerateImage", image([edit(IMG_SAE, "add", 1, value=math.inf)]), INVALID, "plan.edits[0].value"),
    "image: thousands of edits": ("GenerateImage", image(thousands_of_edits(IMG_SAE, IMG_WIDTH)), EXHAUSTED, "plan.edits"),
    "image: steps above the cap": ("GenerateImage", image(steps=IMG_MAX_STEPS + 1), EXHAUSTED, "num_inference_steps"),
    "image: steps 0": ("GenerateImage", image(steps=0), INVALID, "num_inference_steps"),
    "image: guidance NaN": ("GenerateImage", image(guidance_scale=math.nan), INVALID, "guidance_scale"),
    "image: guidance -2": ("GenerateImage", image(guidance_scale=-2.0), INVALID, "guidance_scale"),
    "image: height not a multiple": ("GenerateImage", image(height=7), INVALID, "height"),
    "image: width over the limit": ("GenerateImage", image(width=4096), EXHAUSTED, "width"),
    "image: mask of the wrong shape": ("GenerateImage", image_with_scope(mask=pb.Mask(height=2, width=2, values=[1.0] * 4)), INVALID, "plan.scope.mask"),
    "image: mask with too few values": ("GenerateImage", image_with_scope(mask=pb.Mask(height=2, width=2, values=[1.0] * 3)), INVALID, "plan.scope.mask"),
    "image: mask NaN": ("GenerateImage", image_with_scope(mask=pb.Mask(height=1, width=1, values=[math.nan])), INVALID, "plan.scope.mask"),
    "image: step window start -1": ("GenerateImage", image_with_scope(step_start=-1), INVALID, "plan.scope.step_start"),
    "image: step window end <= start": ("GenerateImage", image_with_scope(step_start=1, step_end=1), INVALID, "plan.scope.step_end"),
    "image: unknown cfg half": ("GenerateImage", image_with_scope(cfg_half=9), INVALID, "plan.scope.cfg_half"),
    "image: uncond half without guidance": ("GenerateImage", image_with_scope(cfg_half=pb.CFG_HALF_UNCOND), INVALID, "plan.scope.cfg_half"),
    "image: deadline too short": ("GenerateImage", image(steps=IMG_MAX_STEPS), DEADLINE, None),
    # -- Encode -----------------------------------------------------------------------------------
    "encode: unknown model": ("Encode", pb.EncodeRequest(model="no-such-model", text="the"), NOT_FOUND, "model"),
    "encode: unknown SAE": ("Encode", pb.EncodeRequest(model=LM, text="the", saes=["zzz"]), NOT_FOUND, "saes[0]"),
    "encode: empty text": ("Encode", pb.EncodeRequest(model=LM, text=""), INVALID, "text"),
    "encode: over-long text": ("Encode", pb.EncodeRequest(model=LM, text="the " * 200), EXHAUSTED, "text"),
    "encode: top_k 100000": ("Encode", pb.EncodeRequest(model=LM, text="the", top_k=100_000), INVALID, "top_k"),
    "encode: top_k -1": ("Encode", pb.EncodeRequest(model=LM, text="the", top_k=-1), INVALID, "top_k"),
    "encode: an image for a text model": ("Encode", pb.EncodeRequest(model=LM, text="the", image=png_bytes(1)), INVALID, "image"),
    "encode: malformed image": ("Encode", pb.EncodeRequest(model=VLM, text="a", image=b"garbage"), INVALID, "image"),
    "encode: oversized image": ("Encode", pb.EncodeRequest(model=VLM, text="a", image=png_bytes(3, size=200)), EXHAUSTED, "image"),
    # -- SearchFeatures ---------------------------------------------------------------------------
    "search: unknown model": ("SearchFeatures", pb.SearchFeaturesRequest(model="no-such-model", query="x"), NOT_FOUND, "model"),
    "search: unknown SAE": ("SearchFeatures", pb.SearchFeaturesRequest(model=LM, sae="zzz"), NOT_FOUND, "sae"),
    "search: index -1": ("SearchFeatures", pb.SearchFeaturesRequest(model=LM, index=-1), INVALID, "index"),
    "search: index d_sae": ("SearchFeatures", pb.SearchFeaturesRequest(model=LM, index=LM_WIDTH), INVALID, "index"),
    "search: limit -1": ("SearchFeatures", pb.SearchFeaturesRequest(model=LM, limit=-1), INVALID, "limit"),
    "search: limit 10**6": ("SearchFeatures", pb.SearchFeaturesRequest(model=LM, limit=10**6), INVALID, "limit"),
}

#: Deadlines (seconds) too short for the request to be met on any machine: below Ray Serve's bare
#: round trip (ListModels, about 3 ms on 2 cores). 20 ms was met by a 64-token generation of the
#: tiny LM on a fast 2-core VM.
SHORT_DEADLINE_S = 0.002

GOOD = {
    "Generate": text(max_new_tokens=1),
    "GenerateStream": text(max_new_tokens=1),
    "GenerateMultimodal": multimodal(png_bytes(5), max_new_tokens=1),
    "GenerateImage": image(),
    "Encode": pb.EncodeRequest(model=LM, text="the cat"),
    "SearchFeatures": pb.SearchFeaturesRequest(model=LM, query="color"),
    "ListModels": pb.ListModelsRequest(),
}

_started: list[float] = []  # wall clock when this module's first test began


@pytest.fixture(scope="module")
def stub(service):
    _started.append(time.time())
    with grpc.insecure_channel(service.target, options=CHANNEL_OPTIONS) as channel:
        yield steering_pb2_grpc.SteeringStub(channel)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_gets_its_status_naming_the_field_and_a_good_request_after_succeeds(stub, case):
    rpc, request, code, field = CASES[case]
    outcome = call(stub, rpc, request, timeout=SHORT_DEADLINE_S if code == DEADLINE else 60.0)
    assert outcome.code == code, outcome.details
    if field is not None:
        assert outcome.field == field, outcome.details
    good = call(stub, rpc, GOOD[rpc])
    assert good.code == grpc.StatusCode.OK, good.details


def test_a_step_window_after_the_run_is_accepted_and_changes_nothing(stub):
    """Documented in sae_runtime (tests/sae_runtime/test_sdxl_turbo.py): edits scoped to steps the
    run does not have apply nowhere, so the image is the unsteered one."""
    outside = call(stub, "GenerateImage", image_with_scope(step_start=5, step_end=8))
    unsteered = call(stub, "GenerateImage", image())
    inside = call(stub, "GenerateImage", image_with_scope(step_start=0, step_end=1))
    assert outside.code == unsteered.code == inside.code == grpc.StatusCode.OK, outside.details
    assert outside.response.png == unsteered.response.png
    assert inside.response.png != unsteered.response.png  # the same edit inside the window does act


def test_list_models_ignores_unknown_fields(service):
    """ListModels has no fields; a message carrying an unknown field (a newer client) still works."""
    unknown_field = b"\x08\x07" + b"\x12\x04junk"  # field 1 varint 7, field 2 bytes "junk"
    with grpc.insecure_channel(service.target) as channel:
        rpc = channel.unary_unary("/steering.v1.Steering/ListModels", request_serializer=None,
                                  response_deserializer=pb.ListModelsResponse.FromString)
        response = rpc(unknown_field, timeout=30)
    assert sorted(m.name for m in response.models) == sorted(SERVED_MODELS)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "GenerateMultimodal", "GenerateImage", "Encode", "SearchFeatures"])
def test_bytes_that_are_not_a_message_are_refused_by_the_proxy_and_the_service_still_answers(service, stub, rpc):
    """Garbage on the wire (a truncated varint) fails to parse in the proxy's gRPC server, before any
    replica: grpcio reports a request deserializer's failure as UNKNOWN ("Error parsing message")."""
    with grpc.insecure_channel(service.target) as channel:
        kind = channel.unary_stream if RPCS[rpc][1] else channel.unary_unary
        raw = kind(f"/steering.v1.Steering/{rpc}", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", timeout=30)) if RPCS[rpc][1] else raw(
                b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", timeout=30)
    assert err.value.code() == grpc.StatusCode.UNKNOWN and "Error parsing message" in err.value.details(), err.value.details()
    assert call(stub, rpc, GOOD[rpc]).code == grpc.StatusCode.OK


def test_a_lone_request_still_succeeds_after_the_whole_matrix(stub):
    for rpc, request in GOOD.items():
        outcome = call(stub, rpc, request)
        assert outcome.code == grpc.StatusCode.OK, f"{rpc}: {outcome.details}"


def test_no_replica_logged_an_unhandled_exception_during_the_matrix(stub):
    time.sleep(1.0)  # let the replicas flush their logs
    assert unexpected_tracebacks(since=_started[0]) == []


def test_the_log_scan_flags_unhandled_exceptions_and_passes_handled_ones(tmp_path):
    """The check above can fail: a synthetic replica log with one handled and one unhandled error."""
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() + 5))
    (tmp_path / "replica_app_model.log").write_text(
        f"ERROR {now},000 app model 1 -- Request failed.\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
        "sae_runtime.errors.InvalidArgument: plan.edits[0].value: must be a finite number\n"
        f"ERROR {now},100 app model 2 -- Request failed.\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
        "ray.exceptions.RayTaskError(TypeError): ray::Replica (pid=1)\n  File \"y.py\", line 2, in h\n"
        "TypeError: unsupported operand\n\nThe above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n  File \"z.py\", line 3, in k\nTypeError: unsupported operand\n"
        f"INFO {now},200 app model 2 -- CALL generate ERROR 3.0ms\n"
    )
    assert unexpected_tracebacks(since=time.time(), log_dir=tmp_path) == ["replica_app_model.log: TypeError: unsupported operand"]
    assert unexpected_tracebacks(since=time.time() + 60, log_dir=tmp_path) == []  # older than `since`: ignored
