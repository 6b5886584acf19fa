"""Bad requests get the right status naming the field, and never hurt anyone else; concurrent
requests with different plans share batches yet each gets exactly its solo result."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services.client import Generation, SteeringClient, SteeringError, edit, plan
from tests.services.helpers import IMAGE, IMG_SAE, LM, LM_LABELS, LM_SAE, VLM, png_bytes

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def masked_image_request() -> pb.GenerateImageRequest:
    request = pb.GenerateImageRequest(model=IMAGE, prompt="a cat", num_inference_steps=1)
    request.plan.edits.append(edit(IMG_SAE, "add", 7, value=1.0))
    request.plan.scope.mask.CopyFrom(pb.Mask(height=2, width=2, values=[0.0, 1.0, 1.0]))  # 3 values, not 4
    return request


BAD_REQUESTS = {
    "unknown model": (lambda c: c.generate("no-such-model", "the"), NOT_FOUND, "model"),
    "no model": (lambda c: c.generate("", "the"), INVALID, "model"),
    "unknown SAE": (lambda c: c.generate(LM, "the", edits=[edit("nope", "set", 1, value=1.0)]), NOT_FOUND, "plan.edits[0].sae"),
    "unknown label": (
        lambda c: c.generate(LM, "the", edits=[edit(LM_SAE, "set", "color:purple", value=1.0)]), NOT_FOUND, "plan.edits[0].labels"
    ),
    "latent out of range": (
        lambda c: c.generate(LM, "the", edits=[edit(LM_SAE, "ablate", 3), edit(LM_SAE, "set", 64, value=1.0)]),
        INVALID,
        "plan.edits[1].latents",
    ),
    "unspecified op": (
        lambda c: c.generate(LM, "the", edits=[pb.LatentEdit(sae=LM_SAE, latents=[1], value=1.0)]), INVALID, "plan.edits[0].op"
    ),
    "non-finite value": (
        lambda c: c.generate(LM, "the", edits=[edit(LM_SAE, "set", 1, value=math.nan)]), INVALID, "plan.edits[0].value"
    ),
    "top_p out of range": (lambda c: c.generate(LM, "the", generation=Generation(top_p=1.5)), INVALID, "params.top_p"),
    "too many logprobs": (lambda c: c.generate(LM, "the", return_logprobs=10_000), INVALID, "return_logprobs"),
    "readout of unknown SAE": (lambda c: c.generate(LM, "the", return_latents=["zzz"]), NOT_FOUND, "return_latents.saes[0]"),
    "too many new tokens": (lambda c: c.generate(LM, "the", generation=Generation(max_new_tokens=500)), EXHAUSTED, "params.max_new_tokens"),
    "too many edits": (
        lambda c: c.generate(LM, "the", edits=[edit(LM_SAE, "ablate", *range(20))]), EXHAUSTED, "plan.edits"
    ),
    "prompt too long": (lambda c: c.generate(LM, "the " * 100), EXHAUSTED, "prompt"),
    "image RPC on a text model": (lambda c: c.generate_image(LM, "a cat"), INVALID, "model"),
    "stream: unknown model": (lambda c: list(c.stream("no-such-model", "the")), NOT_FOUND, "model"),
    "stream: bad edit": (
        lambda c: list(c.stream(LM, "the", edits=[edit(LM_SAE, "set", 99, value=1.0)])), INVALID, "plan.edits[0].latents"
    ),
    "encode: unknown SAE": (lambda c: c.encode(LM, "the", saes=["zzz"]), NOT_FOUND, "saes[0]"),
    "search: unknown SAE": (lambda c: c.search_features(LM, "x", sae="zzz"), NOT_FOUND, "sae"),
    "search: index out of range": (lambda c: c.search_features(LM, index=64), INVALID, "index"),
    "multimodal: not an image": (lambda c: c.generate_multimodal(VLM, b"not an image", "what"), INVALID, "image"),
    "multimodal: image too large": (lambda c: c.generate_multimodal(VLM, png_bytes(1, size=80), "what"), EXHAUSTED, "image"),
    "image: too many steps": (lambda c: c.generate_image(IMAGE, "a cat", num_inference_steps=5), EXHAUSTED, "num_inference_steps"),
    "image: mask of the wrong size": (lambda c: c._call(c._stub.GenerateImage, masked_image_request()), INVALID, "plan.scope.mask"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_naming_the_field_then_service_still_answers(client, case):
    call, code, field = BAD_REQUESTS[case]
    with pytest.raises(SteeringError) as err:
        call(client)
    assert err.value.code == code, err.value.details
    assert err.value.field == field, err.value.details
    good = client.generate(LM, "the cat", generation=Generation(max_new_tokens=3), seed=0)
    assert 1 <= len(good.completion.tokens) <= 3 and good.completion.finish_reason


# -- batching -----------------------------------------------------------------------------------

OPS = ("set", "add", "scale", "cap", "ablate")
PROMPTS = ("the red cat", "a dog is happy", "the sky", "one two three")


def sixteen_requests() -> list[pb.GenerateRequest]:
    """16 requests, each with its own plan (op, latents, value, scope), prompt, seed and sampling."""
    requests = []
    labels = list(LM_LABELS)
    for i in range(16):
        op = OPS[i % len(OPS)]
        targets = (labels[i % len(labels)], (i * 7) % 64)
        value = 0.0 if op == "ablate" else (2.0 + i) * (-1 if i % 3 == 0 else 1)
        edits = [] if i == 15 else [edit(LM_SAE, op, *targets, value=value)]
        requests.append(
            SteeringClient.text_request(
                LM,
                PROMPTS[i % len(PROMPTS)],
                intervention=plan(edits, tokens=("all", "prompt", "generated")[i % 3]),
                generation=Generation(max_new_tokens=6 + i % 4, temperature=0.0 if i % 2 else 0.8),
                seed=100 + i,
                include_default=i % 4 == 0,
                return_logprobs=1,
                return_latents=[LM_SAE] if i % 5 == 0 else False,
            )
        )
    return requests


def same_result(got: pb.GenerateResponse, want: pb.GenerateResponse) -> None:
    assert [t.id for t in got.completion.tokens] == [t.id for t in want.completion.tokens]
    assert got.completion.text == want.completion.text
    assert [t.logprob for t in got.completion.tokens] == pytest.approx([t.logprob for t in want.completion.tokens], abs=1e-4)
    assert [t.id for t in got.default_completion.tokens] == [t.id for t in want.default_completion.tokens]
    assert got.risk.score == pytest.approx(want.risk.score, abs=1e-4)
    assert [[a.index for a in p.saes[0].after] for p in got.prompt_latents] == [
        [a.index for a in p.saes[0].after] for p in want.prompt_latents
    ]


def test_sixteen_concurrent_requests_with_different_plans_each_equal_their_solo_result(client):
    requests = sixteen_requests()
    solo = [client.generate_request(r) for r in requests]  # one at a time: batches of one
    assert all(r.timings.batch_size == 1 for r in solo)
    assert len({tuple(t.id for t in r.completion.tokens) for r in solo}) >= 8  # the plans really differ

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(client.generate_request, requests))
    assert max(r.timings.batch_size for r in together) > 1  # they did share batched passes
    for got, want in zip(together, solo, strict=True):
        same_result(got, want)


def test_streams_share_batches_with_generate_calls_and_equal_their_solo_result(client, service):
    requests = sixteen_requests()[:8]
    solo = [client.generate_request(r) for r in requests]

    def stream(request) -> list[pb.GenerateStreamResponse]:
        stub = steering_pb2_grpc.SteeringStub(channel)
        return list(stub.GenerateStream(request, timeout=120))

    with grpc.insecure_channel(service.target) as channel, ThreadPoolExecutor(len(requests)) as pool:
        # even requests stream, odd ones are unary; all are in flight together
        futures = [pool.submit(stream if i % 2 == 0 else client.generate_request, r) for i, r in enumerate(requests)]
        outcomes = [f.result() for f in futures]
    sizes = []
    for i, (got, want) in enumerate(zip(outcomes, solo, strict=True)):
        if i % 2 == 0:
            *tokens, last = got
            assert last.HasField("final") and not any(m.HasField("final") for m in tokens)
            assert [m.token.id for m in tokens] == [t.id for t in last.final.completion.tokens]
            got = last.final
        same_result(got, want)
        sizes.append(got.timings.batch_size)
    assert max(sizes[0::2]) > 1  # a stream was batched with other requests


def test_invalid_request_in_a_concurrent_burst_fails_alone(client):
    requests = sixteen_requests()[:7]
    bad = SteeringClient.text_request(LM, "the", edits=[edit(LM_SAE, "set", 1000, value=1.0)])
    solo = [client.generate_request(r) for r in requests]

    def call(request):
        try:
            return client.generate_request(request)
        except SteeringError as err:
            return err

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, [*requests[:3], bad, *requests[3:]]))
    error = outcomes.pop(3)
    assert isinstance(error, SteeringError) and error.code == INVALID and error.field == "plan.edits[0].latents"
    for got, want in zip(outcomes, solo, strict=True):
        assert not isinstance(got, SteeringError)
        same_result(got, want)


def test_a_stream_cancelled_by_its_client_frees_the_replica(service, client):
    request = SteeringClient.text_request(LM, "the cat", generation=Generation(max_new_tokens=24), seed=5)
    with grpc.insecure_channel(service.target) as channel:
        call = steering_pb2_grpc.SteeringStub(channel).GenerateStream(request, timeout=60)
        first = next(call)
        call.cancel()
    assert first.HasField("token")
    after = client.generate(LM, "the cat", generation=Generation(max_new_tokens=3), seed=5)
    assert after.completion.tokens[0].id == first.token.id  # greedy: same first token, replica healthy
    assert client.health(LM) == "SERVING"
