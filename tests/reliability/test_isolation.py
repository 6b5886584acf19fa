"""Isolation under load: 1,200 Generate requests, each with its own random edits (op, latents or
labels, value, scope), prompt, seed and sampling, sent 16 at a time through the gRPC proxy so that
they share batched forward passes; each response must equal that request's solo result, computed
in the test process by the library (one request per ``backend.generate`` call, no batching)."""

from __future__ import annotations

import asyncio
import math
import random
import time

import grpc
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services import convert
from services.client import Generation, SteeringClient, edit, plan
from tests.reliability.support import CHANNEL_OPTIONS
from tests.services.helpers import LM, LM_LABELS, LM_LIMITS, LM_SAE, one_thread

N_REQUESTS = 1200
CONCURRENCY = 16
OPS = ("set", "add", "scale", "cap", "ablate")
PROMPTS = ("the red cat", "a dog is happy", "the sky", "one two three", "the", "my cat is blue and the dog")


def random_request(rng: random.Random) -> pb.GenerateRequest:
    edits = []
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        op = rng.choice(OPS)
        targets = rng.sample(range(64), rng.randint(1, 3)) if rng.random() < 0.7 else [rng.choice(sorted(LM_LABELS))]
        value = 0.0 if op == "ablate" else round(rng.uniform(-6, 10), 3)
        edits.append(edit(LM_SAE, op, *targets, value=value, normalize=op == "add" and rng.random() < 0.2))
    sampled = rng.random() < 0.5
    return SteeringClient.text_request(
        LM,
        rng.choice(PROMPTS),
        intervention=plan(edits, tokens=rng.choice(("all", "prompt", "generated")), preserve_error=rng.random() < 0.85),
        generation=Generation(max_new_tokens=rng.randint(2, 4), temperature=0.9 if sampled else 0.0,
                              top_k=rng.choice((0, 8)) if sampled else 0),
        seed=rng.randrange(2**31),
        include_default=rng.random() < 0.2,
        return_logprobs=1,
        return_latents=[LM_SAE] if rng.random() < 0.2 else False,
        latents_top_k=3,
        mitigate_risk_top_n=2 if rng.random() < 0.1 else 0,
    )


def signature(tokens, logprobs, default_tokens, risk, readout) -> tuple:
    return (tuple(tokens), tuple(round(x, 3) for x in logprobs), tuple(default_tokens), round(risk, 4), readout)


def response_signature(r: pb.GenerateResponse) -> tuple:
    return signature(
        [t.id for t in r.completion.tokens], [t.logprob for t in r.completion.tokens],
        [t.id for t in r.default_completion.tokens], r.risk.score,
        tuple(tuple(a.index for a in p.saes[0].after) for p in r.prompt_latents),
    )


def solo_signature(backend, request: pb.GenerateRequest) -> tuple:
    """The library's result for this request alone (a batch of one), in the test process."""
    validated = backend.validate(convert.text_request_from_proto(request, (LM_SAE,), LM_LIMITS["max_new_tokens"]))
    result = backend.generate([validated])[0]
    return signature(
        [t.id for t in result.steered.tokens], [t.logprob for t in result.steered.tokens],
        [t.id for t in result.default.tokens] if result.default is not None else [],
        result.risk_final.probability if result.risk_final is not None else 0.0,
        tuple(tuple(a.index for a in pos[0].after) for pos in result.prompt_latents),
    )


async def run_concurrently(target: str, requests: list[pb.GenerateRequest]) -> list[pb.GenerateResponse]:
    responses: list[pb.GenerateResponse | None] = [None] * len(requests)
    queue = list(range(len(requests)))
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)

        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                responses[i] = await stub.Generate(requests[i], timeout=120)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return responses


def close_enough(got: tuple, want: tuple) -> bool:
    """Token ids, default twin and readout indices exactly; log-probs and risk to float noise."""
    g_tokens, g_lp, g_default, g_risk, g_readout = got
    w_tokens, w_lp, w_default, w_risk, w_readout = want
    return (g_tokens == w_tokens and g_default == w_default and g_readout == w_readout
            and all(math.isclose(a, b, abs_tol=2e-3) for a, b in zip(g_lp, w_lp, strict=True))
            and math.isclose(g_risk, w_risk, abs_tol=2e-4))


def test_every_response_in_a_concurrent_mixed_run_equals_its_solo_result(service, lm_backend):
    rng = random.Random(20261121)
    requests = [random_request(rng) for _ in range(N_REQUESTS)]
    started = time.perf_counter()
    responses = asyncio.run(run_concurrently(service.target, requests))
    served_s = time.perf_counter() - started
    with one_thread():
        started = time.perf_counter()
        solo = [solo_signature(lm_backend, r) for r in requests]
        solo_s = time.perf_counter() - started

    mismatches = [i for i, (resp, want) in enumerate(zip(responses, solo, strict=True)) if not close_enough(response_signature(resp), want)]
    batch_sizes = [r.timings.batch_size for r in responses]
    distinct_outputs = len({s[0] for s in solo})
    print(f"\nisolation: {N_REQUESTS} requests at concurrency {CONCURRENCY} in {served_s:.1f} s "
          f"(mean batch {sum(batch_sizes) / len(batch_sizes):.1f}, max {max(batch_sizes)}); solo reference {solo_s:.1f} s; "
          f"{distinct_outputs} distinct outputs; mismatches: {len(mismatches)}")
    assert max(batch_sizes) >= 8 and sum(b > 1 for b in batch_sizes) > N_REQUESTS // 2  # they really shared passes
    assert distinct_outputs > 50  # the plans and seeds really differ
    assert not mismatches, [(i, response_signature(responses[i]), solo[i]) for i in mismatches[:5]]
