"""Property-based fuzzing through the real gRPC proxy: hypothesis draws request messages for every
RPC, with values from the valid range, its edges and well past them (NaN, +-inf, negative and
2**63-scale integers, unknown enums, path-like names, malformed images, huge lists), and sends them
in concurrent bursts. Property: every call ends OK or with a documented client-error status (never
INTERNAL or UNKNOWN), no replica restarts, and no replica logs an unhandled exception.

Generation is kept cheap (mostly 1-2 new tokens, 1-2 image steps) so a few thousand requests run
in well under a minute and a half on two cores.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from tests.reliability.support import CHANNEL_OPTIONS, acall, deployment_pids, unexpected_tracebacks
from tests.reliability.test_bad_input import png_header_only
from tests.services.helpers import IMAGE, IMG_LABELS, IMG_SAE, LM, LM_LABELS, LM_SAE, VLM, VLM_LABELS, VLM_SAE, png_bytes

#: Statuses the API documents for a client's mistake, plus OK.
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
BURST = 24  # requests drawn per example, sent at once
EXAMPLES = 125  # examples per run: BURST * EXAMPLES = 3,000 requests
MIN_REQUESTS = 2000

# -- strategies --------------------------------------------------------------------------------------
# Each request starts valid for its model and gets a few fields (0 to 3) drawn "wild": from edges and
# well past them. Corrupting a few fields at a time reaches every check and the models themselves;
# corrupting all at once would stop at the first check.
chars = st.characters(codec="utf-8")
short_text = st.text(chars, max_size=24)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
uint64 = st.integers(0, 2**64 - 1)
edge_float = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 8.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 3.4e38])
wild_float = st.one_of(edge_float, st.floats(allow_nan=True, allow_infinity=True))
PATHS = ["../models/x", "/etc/passwd", "..", ".", "./lm", "lm/../lm", "~/.ssh/id_rsa", "file:///etc/passwd", "lm\x00", "saes/res"]
wild_name = st.one_of(st.sampled_from(["", "no-such-model", "LM", " lm", LM, VLM, IMAGE, LM_SAE, VLM_SAE, IMG_SAE, *PATHS]), short_text)
wild_label = st.one_of(st.sampled_from([*LM_LABELS, *VLM_LABELS, *IMG_LABELS, "", "color:"]), short_text)
wild_latent = st.one_of(st.sampled_from([-1, 64, 127, 128, 2**63 - 1, -(2**63)]), st.integers(-3, 140), int64)
wild_int32 = st.one_of(st.sampled_from([-1, 0, 1, 2**31 - 1, -(2**31)]), st.integers(-5, 300), int32)
wild_prompt = st.one_of(
    st.sampled_from(["", "the " * 70, "the " * 5000, "<image> what", "<image> <image>", "\x00", "🙂" * 5, "x" * 5000, " "]),
    st.text(chars, max_size=80),
)
good_prompt = st.sampled_from(["the cat", "a dog is", "the", "the red cat is happy", "one two three"])
GOOD_PNG = (png_bytes(0, size=16), png_bytes(1, size=20), png_bytes(2, size=32))
wild_png = st.one_of(
    st.sampled_from([b"", GOOD_PNG[0][:40], b"\x89PNG\r\n\x1a\n", png_header_only(60_000, 60_000), png_header_only(0, 5),
                     png_bytes(3, size=80), png_bytes(4, size=120), b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"]),
    st.binary(max_size=64),
)

#: model -> (SAE name, d_sae, labels) its valid edits use.
SAES = {LM: (LM_SAE, 64, LM_LABELS), VLM: (VLM_SAE, 64, VLM_LABELS), IMAGE: (IMG_SAE, 128, IMG_LABELS)}
TEXT_FIELDS = ("model", "prompt", "messages", "edits", "op", "latents", "labels", "value", "normalize", "scope", "max_new_tokens",
               "temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "stop", "seed", "readout",
               "logprobs", "mitigate", "image")
IMAGE_FIELDS = ("model", "prompt", "edits", "op", "latents", "labels", "value", "normalize", "scope", "mask", "steps",
                "guidance", "height", "width", "seed", "readout")


def corrupted(fields: tuple[str, ...]) -> st.SearchStrategy[frozenset[str]]:
    return st.sets(st.sampled_from(fields), max_size=3).map(frozenset)


def choose(draw, wild: frozenset[str], name: str, valid: st.SearchStrategy, bad: st.SearchStrategy):
    return draw(bad if name in wild else valid)


def draw_plan(draw, model: str, wild: frozenset[str], kind: str) -> pb.InterventionPlan:
    sae, width, sae_labels = SAES.get(model, SAES[LM])
    msg = pb.InterventionPlan()
    n_edits = choose(draw, wild, "edits", st.integers(0, 3), st.sampled_from([0, 4, 17, 40, 1100]))
    for n in range(n_edits):
        first = n == 0
        msg.edits.append(pb.LatentEdit(
            sae=choose(draw, wild if first else frozenset(), "sae", st.just(sae), wild_name),
            op=choose(draw, wild if first else frozenset(), "op", st.integers(1, 5), st.one_of(st.integers(-3, 9), int32)),
            latents=choose(draw, wild if first else frozenset(), "latents", st.lists(st.integers(0, width - 1), min_size=1, max_size=3),
                           st.lists(wild_latent, max_size=4)),
            labels=choose(draw, wild if first else frozenset(), "labels", st.lists(st.sampled_from(sorted(sae_labels)), max_size=1),
                          st.lists(wild_label, min_size=1, max_size=2)),
            value=choose(draw, wild if first else frozenset(), "value", st.floats(-8, 8), wild_float),
            normalize=choose(draw, wild if first else frozenset(), "normalize", st.just(False), st.booleans()),
        ))
        if msg.edits[-1].op != pb.EDIT_OP_ADD and "normalize" not in wild:
            msg.edits[-1].normalize = False
    scope = msg.scope
    if "scope" in wild:
        scope.tokens, scope.vision, scope.cfg_half = draw(wild_int32), draw(wild_int32), draw(wild_int32)
        scope.step_start = draw(wild_int32)
        if draw(st.booleans()):
            scope.step_end = draw(wild_int32)
    elif kind == "text":
        scope.tokens = draw(st.integers(0, 2))
        if model == VLM:  # a vision scope on a causal LM is INVALID_ARGUMENT (it does not apply)
            scope.vision = draw(st.integers(0, 1))
    else:
        scope.step_start = draw(st.integers(0, 1))
        if draw(st.booleans()):
            scope.step_end = draw(st.integers(scope.step_start + 1, 3))
    if "mask" in wild:
        h, w = draw(st.integers(0, 70)), draw(st.integers(0, 70))
        n = draw(st.sampled_from([h * w, max(h * w - 1, 0), h * w + 1]))
        values = draw(st.lists(st.floats(0, 1, width=32) | edge_float, min_size=min(n, 64), max_size=min(n, 64)))
        scope.mask.CopyFrom(pb.Mask(height=h, width=w, values=(values * (n // max(len(values), 1) + 1))[:n] if values else []))
    if draw(st.booleans()):
        msg.preserve_error = draw(st.booleans())
    return msg


def draw_readout(draw, model: str, wild: frozenset[str]) -> pb.LatentReadout | None:
    if "readout" in wild:
        return pb.LatentReadout(saes=draw(st.lists(wild_name, max_size=2)), top_k=draw(wild_int32))
    if draw(st.integers(0, 3)):
        return None
    return pb.LatentReadout(saes=draw(st.lists(st.just(SAES[model][0]), max_size=1)), top_k=draw(st.integers(0, 6)))


@st.composite
def text_requests(draw, multimodal: bool = False):
    wild = draw(corrupted(TEXT_FIELDS))
    model = VLM if multimodal else draw(st.sampled_from([LM, LM, LM, VLM]))
    cls = pb.GenerateMultimodalRequest if multimodal else pb.GenerateRequest
    params = pb.GenerationParams(
        temperature=choose(draw, wild, "temperature", st.sampled_from([0.0, 0.7, 1.3]), wild_float),
        top_k=choose(draw, wild, "top_k", st.sampled_from([0, 0, 5]), wild_int32),
        frequency_penalty=choose(draw, wild, "frequency_penalty", st.sampled_from([0.0, 0.5]), wild_float),
        stop=choose(draw, wild, "stop", st.lists(st.sampled_from(["cat", "."]), max_size=1), st.lists(short_text, min_size=1, max_size=3)),
    )
    if "max_new_tokens" in wild:
        if draw(st.booleans()):  # unset: the model's default (24 or 16 here)
            params.max_new_tokens = draw(wild_int32)
    else:
        params.max_new_tokens = draw(st.integers(1, 2))
    if draw(st.booleans()) or "top_p" in wild:
        params.top_p = choose(draw, wild, "top_p", st.floats(0.125, 1.0, width=32), wild_float)
    if draw(st.booleans()) or "repetition_penalty" in wild:
        params.repetition_penalty = choose(draw, wild, "repetition_penalty", st.floats(0.5, 2.0, width=32), wild_float)
    msg = cls(
        model=choose(draw, wild, "model", st.just(model), wild_name),
        prompt=choose(draw, wild, "prompt", good_prompt, wild_prompt),
        plan=draw_plan(draw, model, wild, "text"),
        params=params,
        include_default=draw(st.booleans()),
        return_logprobs=choose(draw, wild, "logprobs", st.integers(0, 3), wild_int32),
        mitigate_risk_top_n=choose(draw, wild, "mitigate", st.sampled_from([0, 0, 2]) if model == LM else st.just(0), wild_int32),
    )
    if model == VLM and not multimodal and "edits" not in wild:
        del msg.plan.edits[:]  # the VLM's only SAE reads the vision tower: no image, nothing to edit
    if "messages" in wild:
        msg.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in draw(st.lists(st.tuples(short_text, short_text), max_size=3)))
        if draw(st.booleans()):
            msg.prompt = ""
    if multimodal:
        msg.image = choose(draw, wild, "image", st.sampled_from(GOOD_PNG), wild_png)
    draw_seed_and_readout(draw, msg, model, wild)
    return msg


def draw_seed_and_readout(draw, msg: pb.GenerateRequest | pb.GenerateMultimodalRequest | pb.GenerateImageRequest, model: str, wild: frozenset[str]) -> None:
    """A seed (sometimes, always when corrupted) and the latents to return (sometimes) on ``msg``."""
    if draw(st.booleans()) or "seed" in wild:
        msg.seed = choose(draw, wild, "seed", st.integers(0, 1000), uint64)
    readout = draw_readout(draw, model, wild)
    if readout is not None:
        msg.return_latents.CopyFrom(readout)


@st.composite
def image_requests(draw) -> pb.GenerateImageRequest:
    wild = draw(corrupted(IMAGE_FIELDS))
    msg = pb.GenerateImageRequest(
        model=choose(draw, wild, "model", st.just(IMAGE), wild_name),
        prompt=choose(draw, wild, "prompt", good_prompt, wild_prompt),
        negative_prompt=draw(st.sampled_from(["", "blurry"])),
        guidance_scale=choose(draw, wild, "guidance", st.sampled_from([0.0, 0.0, 1.5]), wild_float),
        height=choose(draw, wild, "height", st.sampled_from([0, 32]), wild_int32),
        width=choose(draw, wild, "width", st.sampled_from([0, 32]), wild_int32),
        plan=draw_plan(draw, IMAGE, wild, "image"),
        include_default=draw(st.integers(0, 4)) == 0,
    )
    if msg.plan.scope.cfg_half == pb.CFG_HALF_UNCOND and "scope" not in wild and msg.guidance_scale <= 1:
        msg.plan.scope.cfg_half = pb.CFG_HALF_BOTH
    if "steps" in wild:
        if draw(st.booleans()):
            msg.num_inference_steps = draw(wild_int32)
    else:
        msg.num_inference_steps = draw(st.integers(1, 2))
    draw_seed_and_readout(draw, msg, IMAGE, wild)
    return msg


@st.composite
def encode_requests(draw) -> pb.EncodeRequest:
    wild = draw(corrupted(("model", "text", "image", "saes", "top_k")))
    model = draw(st.sampled_from([LM, LM, VLM, IMAGE]))
    image = draw(st.sampled_from(GOOD_PNG)) if model == VLM and draw(st.booleans()) else b""
    return pb.EncodeRequest(
        model=choose(draw, wild, "model", st.just(model), wild_name),
        text=choose(draw, wild, "text", good_prompt, wild_prompt),
        image=choose(draw, wild, "image", st.just(image), wild_png),
        saes=choose(draw, wild, "saes", st.lists(st.just(SAES[model][0]), max_size=1), st.lists(wild_name, min_size=1, max_size=2)),
        top_k=choose(draw, wild, "top_k", st.integers(0, 8), wild_int32),
    )


@st.composite
def search_requests(draw) -> pb.SearchFeaturesRequest:
    wild = draw(corrupted(("model", "sae", "query", "index", "limit")))
    model = draw(st.sampled_from([LM, VLM, IMAGE]))
    sae, width, sae_labels = SAES[model]
    msg = pb.SearchFeaturesRequest(
        model=choose(draw, wild, "model", st.just(model), wild_name),
        sae=choose(draw, wild, "sae", st.sampled_from(["", sae]), wild_name),
        query=choose(draw, wild, "query", st.sampled_from(["", "color", *sae_labels]), wild_label),
        limit=choose(draw, wild, "limit", st.integers(0, 30), wild_int32),
    )
    if draw(st.booleans()) or "index" in wild:
        msg.index = choose(draw, wild, "index", st.integers(0, width - 1), wild_latent)
    return msg


requests = st.one_of(
    text_requests().map(lambda m: ("Generate", m)),
    text_requests().map(lambda m: ("Generate", m)),
    text_requests().map(lambda m: ("GenerateStream", m)),
    text_requests(multimodal=True).map(lambda m: ("GenerateMultimodal", m)),
    image_requests().map(lambda m: ("GenerateImage", m)),
    encode_requests().map(lambda m: ("Encode", m)),
    search_requests().map(lambda m: ("SearchFeatures", m)),
    st.just(("ListModels", pb.ListModelsRequest())),
)


# -- the run -----------------------------------------------------------------------------------------
class Tally:
    def __init__(self) -> None:
        self.by_rpc_status: Counter[tuple[str, str]] = Counter()
        self.bad: list[str] = []
        self.started = 0.0  # wall clock at the start of the fuzz

    @property
    def total(self) -> int:
        return sum(self.by_rpc_status.values())


@pytest.fixture(scope="module")
def fuzz_run(service):
    """A loop and an aio channel for the bursts, the replica PIDs before, and the tally."""
    loop = asyncio.new_event_loop()

    async def open_channel():
        return grpc.aio.insecure_channel(service.target, options=CHANNEL_OPTIONS)

    channel = loop.run_until_complete(open_channel())
    pids_before = deployment_pids("steering")
    tally = Tally()
    tally.started = time.time()
    yield loop, steering_pb2_grpc.SteeringStub(channel), tally, pids_before
    loop.run_until_complete(channel.close())
    loop.close()


def test_fuzzed_requests_end_ok_or_with_a_documented_status(fuzz_run):
    loop, stub, tally, _ = fuzz_run

    # No shrinking: a failure already lists each offending request exactly, and shrinking bursts of
    # live calls would take minutes.
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate], print_blob=True)
    @given(burst=st.lists(requests, min_size=BURST, max_size=BURST))
    def burst_property(burst):
        async def send_all():
            return await asyncio.gather(*(acall(stub, rpc, msg, timeout=60) for rpc, msg in burst))

        outcomes = loop.run_until_complete(send_all())
        bad = []
        for (rpc, msg), outcome in zip(burst, outcomes):
            tally.by_rpc_status[(rpc, outcome.code.name)] += 1
            if outcome.code not in DOCUMENTED:
                bad.append(f"{rpc} -> {outcome.code.name}: {outcome.details}\n{msg!r}"[:1500])
        tally.bad.extend(bad)
        assert not bad, "\n".join(bad)

    started = time.perf_counter()
    burst_property()
    elapsed = time.perf_counter() - started
    ok = sum(n for (_, status), n in tally.by_rpc_status.items() if status == "OK")
    print(f"\nfuzz: {tally.total} requests in {elapsed:.1f} s, {ok} OK; by RPC and status: {dict(sorted(tally.by_rpc_status.items()))}")
    assert tally.total >= MIN_REQUESTS
    for rpc in ("Generate", "GenerateStream", "GenerateMultimodal", "GenerateImage", "Encode", "SearchFeatures"):
        rpc_ok = tally.by_rpc_status[(rpc, "OK")]
        assert rpc_ok >= 10, f"only {rpc_ok} {rpc} calls succeeded: the fuzz hardly reached that model"
    assert not tally.bad


def test_no_replica_restarted_and_none_logged_an_unhandled_exception(fuzz_run):
    _, _, tally, pids_before = fuzz_run
    assert tally.total >= MIN_REQUESTS  # runs after the fuzz
    assert deployment_pids("steering") == pids_before
    time.sleep(1.0)
    assert unexpected_tracebacks(since=tally.started) == []
