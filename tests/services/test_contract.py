"""The gRPC contract as a client outside the project sees it, against the session's service:
google.rpc.Status details in grpc-status-details-bin, server reflection v1 and v1alpha, ListModels
versions equal to the responses' versions, and a seed that takes the whole uint64 range."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services import cli
from services.client import Generation, SteeringClient, SteeringError, edit
from tests.services.helpers import IMAGE, LM, LM_LIMITS, LM_SAE

WIDTH = 64  # d_sae of the session's LM SAE


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.target) as ch:
        yield ch


def rich_details(err: grpc.RpcError) -> status_pb2.Status:
    """Decode grpc-status-details-bin the way any gRPC client library does (no project code)."""
    (raw,) = [v for k, v in err.trailing_metadata() if k == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    assert status.code == err.code().value[0] and status.message == err.details()
    return status


def unpack(status: status_pb2.Status, cls):
    (packed,) = status.details
    assert packed.Is(cls.DESCRIPTOR), packed.type_url
    out = cls()
    packed.Unpack(out)
    return out


def fail(channel, request: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        steering_pb2_grpc.SteeringStub(channel).Generate(request, timeout=60)
    return info.value


def text(**options) -> pb.GenerateRequest:
    options.setdefault("generation", Generation(max_new_tokens=2))
    return SteeringClient.text_request(options.pop("model", LM), options.pop("prompt", "the cat"), **options)


def test_invalid_argument_carries_a_bad_request_field_violation(channel):
    err = fail(channel, text(edits=[edit(LM_SAE, "set", WIDTH, value=1.0)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = unpack(rich_details(err), error_details_pb2.BadRequest)
    (violation,) = bad.field_violations
    assert violation.field == "plan.edits[0].latents"
    assert f"out of range [0, {WIDTH})" in violation.description


def test_not_found_carries_resource_info(channel):
    err = fail(channel, text(model="no-such-model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    info = unpack(rich_details(err), error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("model", "no-such-model")
    err = fail(channel, text(edits=[edit(LM_SAE, "set", "color:purple", value=1.0)]))
    info = unpack(rich_details(err), error_details_pb2.ResourceInfo)
    assert info.resource_type == "labels" and "color:purple" in info.description


def test_resource_exhausted_carries_a_quota_failure(channel):
    err = fail(channel, text(generation=Generation(max_new_tokens=LM_LIMITS["max_new_tokens"] + 1)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = unpack(rich_details(err), error_details_pb2.QuotaFailure)
    (violation,) = quota.violations
    assert violation.subject == "params.max_new_tokens"
    assert str(LM_LIMITS["max_new_tokens"]) in violation.description


def test_the_python_client_and_the_cli_read_the_details(client, service, capsys, monkeypatch):
    with pytest.raises(SteeringError) as info:
        client.generate(LM, "the cat", edits=[edit(LM_SAE, "set", -1, value=1.0)], generation=Generation(max_new_tokens=2))
    assert info.value.field == "plan.edits[0].latents"
    assert info.value.field_violations[0][0] == "plan.edits[0].latents"
    with pytest.raises(SteeringError) as info:
        client.generate("no-such-model", "the cat")
    assert info.value.resource == ("model", "no-such-model")
    monkeypatch.setenv("COLUMNS", "200")
    code = cli.main(["--target", service.target, "generate", "--model", LM, "--sae", LM_SAE, "--set", f"{WIDTH}=1", "x"])
    out = capsys.readouterr().out
    assert code == 2 and "bad field plan.edits[0].latents" in out


def test_a_scope_that_does_not_apply_is_invalid_argument_naming_the_field(channel):
    request = text(edits=[edit(LM_SAE, "set", 1, value=1.0)])
    request.plan.scope.vision = pb.VISION_SCOPE_CLS
    bad = unpack(rich_details(fail(channel, request)), error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "plan.scope.vision"
    image = pb.GenerateImageRequest(model=IMAGE, prompt="a cat", num_inference_steps=1, seed=0)
    image.plan.scope.tokens = pb.TOKEN_SCOPE_PROMPT
    with pytest.raises(grpc.RpcError) as info:
        steering_pb2_grpc.SteeringStub(channel).GenerateImage(image, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unpack(rich_details(info.value), error_details_pb2.BadRequest).field_violations[0].field == "plan.scope.tokens"


def reflect(channel, version: str, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    """One reflection call on grpc.reflection.<version>; v1 and v1alpha share the wire format."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([request]), timeout=30))
    return response


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_server_reflection(channel, version):
    listed = reflect(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"steering.v1.Steering", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
    found = reflect(channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol="steering.v1.Steering"))
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in found.file_descriptor_response.file_descriptor_proto]
    (steering,) = [f for f in files if f.package == "steering.v1"]
    assert "Generate" in {m.name for s in steering.service for m in s.method}


def test_list_models_reports_the_versions_responses_carry(client):
    (info,) = [m for m in client.list_models() if m.name == LM]
    response = client.generate(LM, "the cat", generation=Generation(max_new_tokens=1), seed=0)
    assert info.version and info.version == response.versions.model_version
    assert {s.name: s.version for s in info.saes} == dict(response.versions.saes)
    assert all(s.version for s in info.saes)


def test_seed_takes_the_whole_uint64_range(client):
    runs = [client.generate(LM, "the cat", generation=Generation(max_new_tokens=4, temperature=1.0), seed=2**64 - 1)
            for _ in range(2)]
    assert runs[0].completion.text == runs[1].completion.text
    assert [t.id for t in runs[0].completion.tokens] == [t.id for t in runs[1].completion.tokens]


def test_a_failed_stream_names_the_field_in_its_message(client):
    """GenerateStream errors carry code and message; Ray Serve 2.60's proxy drops the trailers of a
    stream that fails (gRPCStatusError keeps code and details only), so the client falls back to
    the field the message starts with."""
    with pytest.raises(SteeringError) as info:
        list(client.stream(LM, "the cat", edits=[edit(LM_SAE, "set", WIDTH, value=1.0)], generation=Generation(max_new_tokens=2)))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "plan.edits[0].latents"


def test_a_client_built_from_reflection_alone_calls_generate(channel):
    """No generated code: the descriptors come from server reflection v1, the messages are built
    from them, and the field names and enum names are the ones steering.proto documents."""
    from google.protobuf import descriptor_pool, message_factory

    found = reflect(channel, "v1", reflection_pb2.ServerReflectionRequest(file_containing_symbol="steering.v1.Steering"))
    pool = descriptor_pool.DescriptorPool()
    pending = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in found.file_descriptor_response.file_descriptor_proto]
    while pending:  # add files once their dependencies are in
        ready = [f for f in pending if all(_has_file(pool, d) for d in f.dependency)]
        assert ready, [f.name for f in pending]
        for f in ready:
            pool.Add(f)
            pending.remove(f)
    request_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("steering.v1.GenerateRequest"))
    response_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("steering.v1.GenerateResponse"))
    request = request_cls(model=LM, prompt="the cat", seed=7)
    request.params.max_new_tokens = 3
    set_edit = request.plan.edits.add(sae=LM_SAE, latents=[1], value=5.0)
    set_edit.op = pool.FindEnumTypeByName("steering.v1.EditOp").values_by_name["EDIT_OP_SET"].number
    call = channel.unary_unary("/steering.v1.Steering/Generate", request_serializer=request_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
    response = call(request, timeout=60)
    assert response.steered and len(response.completion.tokens) == 3
    assert response.versions.model == LM


def _has_file(pool, name: str) -> bool:
    try:
        pool.FindFileByName(name)
        return True
    except KeyError:
        return False
