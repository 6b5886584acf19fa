"""The service's pure pieces, without Ray: proto -> spec conversion, error -> status mapping,
batch-failure isolation, bearer-token checks, HTTP event streams closing what they relay."""

from __future__ import annotations

import asyncio
import pickle

import grpc
import pytest
import torch
from ray.exceptions import RayTaskError
from steering.v1 import steering_pb2 as pb

from sae_runtime.backends import types as rt
from sae_runtime.errors import DeadlineExceeded, FormatError, InvalidArgument, NotFound, TooLarge
from sae_runtime.plan import CfgHalf, EditOp, InterventionPlan, LatentEdit, TokenScope, VisionScope
from services import convert
from services.errors import Unauthenticated, grpc_status
from services.ingress import SteeringIngress, _resolve_token, status_changes
from sae_runtime.engine.images import run_isolated
from sae_runtime.versions import fingerprint


# -- conversion ---------------------------------------------------------------------------------


def test_plan_from_proto_maps_every_field():
    msg = pb.InterventionPlan(
        edits=[
            pb.LatentEdit(sae="a", op=pb.EDIT_OP_SET, latents=[1, 2], labels=["x"], value=3.5),
            pb.LatentEdit(sae="b", op=pb.EDIT_OP_ADD, latents=[4], value=-1.0, normalize=True),
            pb.LatentEdit(sae="b", op=pb.EDIT_OP_ABLATE, latents=[5]),
            pb.LatentEdit(sae="b", op=pb.EDIT_OP_SCALE, latents=[6], value=0.5),
            pb.LatentEdit(sae="b", op=pb.EDIT_OP_CAP, latents=[7], value=2.0),
        ],
        scope=pb.Scope(
            tokens=pb.TOKEN_SCOPE_GENERATED,
            vision=pb.VISION_SCOPE_CLS,
            mask=pb.Mask(height=2, width=3, values=[0, 0.5, 1, 1, 0.5, 0]),
            step_start=1,
            step_end=3,
            cfg_half=pb.CFG_HALF_UNCOND,
        ),
        preserve_error=False,
    )
    plan = convert.plan_from_proto(msg)
    assert plan.edits == (
        LatentEdit("a", EditOp.SET, latents=(1, 2), labels=("x",), value=3.5),
        LatentEdit("b", EditOp.ADD, latents=(4,), value=-1.0, normalize=True),
        LatentEdit("b", EditOp.ABLATE, latents=(5,)),
        LatentEdit("b", EditOp.SCALE, latents=(6,), value=0.5),
        LatentEdit("b", EditOp.CAP, latents=(7,), value=2.0),
    )
    s = plan.scope
    assert (s.tokens, s.vision, s.step_start, s.step_end, s.cfg_half) == (
        TokenScope.GENERATED, VisionScope.CLS, 1, 3, CfgHalf.UNCOND
    )
    assert torch.equal(s.mask, torch.tensor([[0, 0.5, 1], [1, 0.5, 0]]))
    assert plan.preserve_error is False


def test_plan_defaults_keep_the_error_term_and_apply_everywhere():
    plan = convert.plan_from_proto(pb.InterventionPlan())
    assert plan == InterventionPlan()
    assert plan.preserve_error is True and plan.scope.mask is None and plan.scope.step_end is None


@pytest.mark.parametrize(
    "msg, field",
    [
        (pb.InterventionPlan(edits=[pb.LatentEdit(sae="a", latents=[1])]), "plan.edits[0].op"),
        (pb.InterventionPlan(edits=[pb.LatentEdit(sae="a", op=99, latents=[1])]), "plan.edits[0].op"),
        (pb.InterventionPlan(scope=pb.Scope(tokens=7)), "plan.scope.tokens"),
        (pb.InterventionPlan(scope=pb.Scope(mask=pb.Mask(height=2, width=2, values=[1.0]))), "plan.scope.mask"),
        (pb.InterventionPlan(scope=pb.Scope(mask=pb.Mask(height=0, width=3, values=[]))), "plan.scope.mask"),
    ],
)
def test_malformed_plans_name_the_field(msg, field):
    with pytest.raises(InvalidArgument) as err:
        convert.plan_from_proto(msg)
    assert err.value.field == field


def test_text_request_defaults_and_options():
    bare = convert.text_request_from_proto(pb.GenerateRequest(model="m", prompt="hi"), ["s1", "s2"], max_new_tokens_limit=10)
    assert bare.sampling == rt.SamplingParams(max_new_tokens=10)  # library default 32, capped at the limit
    assert bare.readout is None and bare.image is None and bare.plan == InterventionPlan()

    msg = pb.GenerateRequest(model="m", prompt="hi", seed=7, include_default=True, return_logprobs=3, mitigate_risk_top_n=2)
    msg.params.CopyFrom(pb.GenerationParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=4, repetition_penalty=1.2,
                                            frequency_penalty=0.1, stop=["."]))
    msg.return_latents.CopyFrom(pb.LatentReadout())
    request = convert.text_request_from_proto(msg, ["s1", "s2"])
    assert request.sampling == rt.SamplingParams(
        max_new_tokens=5, temperature=pytest.approx(0.7), top_p=pytest.approx(0.9), top_k=4,
        repetition_penalty=pytest.approx(1.2), frequency_penalty=pytest.approx(0.1), stop=(".",), seed=7,
    )
    assert request.readout.saes == ("s1", "s2") and request.readout.top_k == convert.DEFAULT_TOP_K
    assert (request.include_default, request.logprobs, request.mitigate_risk_top_n) == (True, 3, 2)

    multimodal = convert.text_request_from_proto(pb.GenerateMultimodalRequest(model="m", prompt="hi", image=b"png"), [])
    assert multimodal.image == b"png"


@pytest.mark.parametrize(
    "library, wire",
    [
        ("sampling.top_p", "params.top_p"),
        ("sampling.seed", "seed"),
        ("readout.saes[0]", "return_latents.saes[0]"),
        ("readout", "return_latents"),
        ("logprobs", "return_logprobs"),
        ("plan.edits[0].latents", "plan.edits[0].latents"),
        ("samplingfoo", "samplingfoo"),
        (None, None),
    ],
)
def test_library_field_names_become_proto_field_names(library, wire):
    assert convert.proto_field(library) == wire


def test_results_to_proto_keep_values_and_labels():
    tok = rt.GeneratedToken(id=5, text="cat", logprob=-0.5, top_logprobs=(("cat", -0.5), ("dog", -1.5)),
                            latents=(rt.PositionLatents("s", (rt.LatentActivation(3, 2.0, "color:red"),), ()),))
    result = rt.TextResult(
        steered=rt.Completion("cat", (tok,), "length"),
        risk_final=rt.RiskScore(0.25, (rt.RiskContribution("s", 3, None, 0.4),)),
    )
    msg = convert.text_result_to_proto(result, timings=pb.Timings(compute_ms=1), versions=pb.Versions(model="m"), steered=True)
    (t,) = msg.completion.tokens
    assert (t.id, t.text, t.logprob) == (5, "cat", -0.5)
    assert [(x.token, x.logprob) for x in t.top_logprobs] == [("cat", -0.5), ("dog", -1.5)]
    assert (t.latents[0].before[0].index, t.latents[0].before[0].label) == (3, "color:red")
    assert msg.risk.score == 0.25 and msg.risk.top_concepts[0].label == ""
    assert not msg.HasField("default_completion") and not msg.HasField("risk_prompt")


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, code",
    [
        (NotFound("no such SAE", field="plan.edits[0].sae"), grpc.StatusCode.NOT_FOUND),
        (InvalidArgument("bad", field="params.top_p"), grpc.StatusCode.INVALID_ARGUMENT),
        (TooLarge("too many", field="params.max_new_tokens"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("late", field="deadline"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (FormatError("corrupt", field="/x/cfg.json"), grpc.StatusCode.FAILED_PRECONDITION),
        (Unauthenticated("no token", field="authorization"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_typed_errors_map_to_their_status_with_the_field_in_the_details(exc, code):
    assert grpc_status(exc) == (code, f"{exc.field}: {exc.message}")
    # the same error raised in another replica arrives pickled, wrapped by Ray
    wrapped = RayTaskError("generate", "Traceback ...", pickle.loads(pickle.dumps(exc))).as_instanceof_cause()
    assert grpc_status(wrapped) == (code, f"{exc.field}: {exc.message}")


def test_unexpected_errors_are_internal_and_timeouts_deadline_exceeded():
    code, details = grpc_status(ZeroDivisionError("division by zero"))
    assert code == grpc.StatusCode.INTERNAL and "ZeroDivisionError" in details
    assert grpc_status(TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED


# -- batch isolation ----------------------------------------------------------------------------


def test_a_failing_batch_is_retried_row_by_row_so_only_the_culprit_fails():
    calls = []

    def generate(rows):
        calls.append(list(rows))
        if "boom" in rows:
            raise RuntimeError("boom")
        return [r.upper() for r in rows]

    out = run_isolated(generate, ["a", "boom", "c"])
    assert out[0] == "A" and out[2] == "C"
    assert isinstance(out[1], RuntimeError)
    assert calls == [["a", "boom", "c"], ["a"], ["boom"], ["c"]]
    assert run_isolated(generate, ["x", "y"]) == ["X", "Y"] and calls[-1] == ["x", "y"]


def test_wrong_result_count_counts_as_failure():
    out = run_isolated(lambda rows: [], ["only"])
    assert isinstance(out[0], RuntimeError)


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    first = fingerprint(str(tmp_path))
    assert first and fingerprint(str(tmp_path)) == first
    (tmp_path / "a.json").write_text('{"x": 1}')
    assert fingerprint(str(tmp_path)) != first
    assert fingerprint("org/hub-id") == "org/hub-id" and fingerprint(None) == ""


# -- auth ---------------------------------------------------------------------------------------


class Metadata:
    def __init__(self, pairs):
        self.pairs = pairs

    def invocation_metadata(self):
        return self.pairs


def test_bearer_token_check(monkeypatch):
    ingress = SteeringIngress.func_or_class.__new__(SteeringIngress.func_or_class)
    ingress._token = "s3cret-token"
    ingress._authenticate(Metadata([("authorization", "Bearer s3cret-token")]))
    for pairs in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")]):
        with pytest.raises(Unauthenticated) as err:
            ingress._authenticate(Metadata(pairs))
        assert err.value.field == "authorization"
    ingress._token = None
    ingress._authenticate(Metadata([]))  # no token configured: open

    assert _resolve_token({}) is None
    assert _resolve_token({"bearer_token": "literal-token"}) == "literal-token"
    monkeypatch.setenv("STEERING_TEST_TOKEN", "from-env-token")
    assert _resolve_token({"bearer_token_env": "STEERING_TEST_TOKEN"}) == "from-env-token"
    monkeypatch.delenv("STEERING_TEST_TOKEN")
    with pytest.raises(RuntimeError, match="STEERING_TEST_TOKEN"):
        _resolve_token({"bearer_token_env": "STEERING_TEST_TOKEN"})


def test_health_watch_sends_the_first_status_then_only_changes():
    script = iter([1, 1, 2, 2, 2, 1, 3])
    probed: list[int] = []

    async def probe() -> int:
        probed.append(next(script))
        return probed[-1]

    async def main() -> list[int]:
        sent = []
        async for status in status_changes(probe, 0.0):
            sent.append(status)
            if len(sent) == 4:
                return sent
        return sent

    assert asyncio.run(main()) == [1, 2, 1, 3]
    assert probed == [1, 1, 2, 2, 2, 1, 3]


# -- HTTP event streams --------------------------------------------------------------------------

class _CountingIngress:
    """An ingress whose GenerateStream yields numbered tokens and records when it is closed."""

    def __init__(self) -> None:
        self.closed = False

    async def GenerateStream(self, request, context):  # noqa: N802 - the RPC's name
        try:
            for i in range(1000):
                yield pb.GenerateStreamResponse(token=pb.Token(id=i))
        finally:
            self.closed = True


def test_an_http_event_stream_closed_by_its_reader_closes_the_ingress_stream_at_once():
    """The HTTP relay (IngressCalls.stream, then started()'s replay) closed after its first item:
    the ingress stream under it is closed during that close, not later by the event loop's
    finalizer (the ingress then cancels the model's row)."""
    from services.http.app import started
    from services.http.calls import IngressCalls

    async def main() -> tuple[bool, bool]:
        direct = _CountingIngress()
        stream = IngressCalls(direct).stream(pb.GenerateRequest(), {})
        assert (await anext(stream)).token.id == 0
        await stream.aclose()
        relayed = _CountingIngress()
        events = await started(IngressCalls(relayed).stream(pb.GenerateRequest(), {}))
        assert (await anext(events)).token.id == 0 and not relayed.closed
        await events.aclose()
        return direct.closed, relayed.closed

    assert asyncio.run(main()) == (True, True)
