"""``engine.separate_process`` through the service: the session's LM, served by an application whose
replica runs its engine in a child process, answers exactly as the session's own deployment does
(the engine in the replica's thread), for concurrent steered requests, streams and bad input."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from steering.v1 import steering_pb2 as pb

from sae_runtime.errors import Unavailable
from services.client import Generation, SteeringClient, edit
from services.errors import grpc_status
from tests.services.helpers import LM, LM_SAE, free_port, second_application, service_config
from tests.services.test_errors_and_batching import same_result, sixteen_requests

APP = "process-engine"
MAIN = (("application", "steering"),)
TIMEOUT_S = 120


def process_config() -> dict:
    """The session's config with only ``lm``, its engine in a child process, colocated in the
    ingress of another application."""
    config = service_config(free_port())
    (lm,) = [m for m in config["models"] if m["name"] == LM]
    lm = {**lm, "engine": {**lm["engine"], "separate_process": True}}
    return config | {"app_name": APP, "ingress": {"num_cpus": 0.05, "colocate_models": True}, "models": [lm]}


@pytest.fixture(scope="module")
def process_app(service):
    with second_application(service, process_config()) as metadata:
        yield metadata


def test_concurrent_steered_requests_equal_the_in_replica_engine(process_app, stub):
    requests = sixteen_requests()
    want = [stub.Generate(r, timeout=TIMEOUT_S, metadata=MAIN) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: stub.Generate(r, timeout=TIMEOUT_S, metadata=process_app), requests))
    assert max(r.timings.batch_size for r in got) > 1  # the child batched them
    for g, w in zip(got, want, strict=True):
        same_result(g, w)


def test_a_stream_from_the_child_equals_the_unary_answer(process_app, stub):
    request = sixteen_requests()[4]
    want = stub.Generate(request, timeout=TIMEOUT_S, metadata=MAIN)
    streamed = list(stub.GenerateStream(request, timeout=TIMEOUT_S, metadata=process_app))
    assert [m.token.id for m in streamed[:-1]] == [t.id for t in want.completion.tokens]
    same_result(streamed[-1].final, want)


def test_bad_input_gets_its_status_and_the_child_keeps_serving(process_app, stub):
    bad = SteeringClient.text_request(LM, "the", edits=[edit(LM_SAE, "set", 10**6, value=1.0)], generation=Generation(max_new_tokens=1))
    with pytest.raises(grpc.RpcError) as invalid:
        stub.Generate(bad, timeout=TIMEOUT_S, metadata=process_app)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "plan.edits[0].latents" in invalid.value.details()
    too_long = SteeringClient.text_request(LM, "the", generation=Generation(max_new_tokens=10**4))
    with pytest.raises(grpc.RpcError) as large:
        stub.Generate(too_long, timeout=TIMEOUT_S, metadata=process_app)
    assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Generate(sixteen_requests()[1], timeout=TIMEOUT_S, metadata=process_app).completion.tokens
    # Encode runs on the replica's own copy of the model, beside the child
    request = pb.EncodeRequest(model=LM, text="the red cat", saes=[LM_SAE])
    encoded = stub.Encode(request, timeout=TIMEOUT_S, metadata=process_app)
    want = stub.Encode(request, timeout=TIMEOUT_S, metadata=MAIN)
    assert list(encoded.tokens) == list(want.tokens) and len(encoded.latents) == len(want.tokens) > 0


def test_when_the_child_dies_the_health_check_fails_and_requests_are_unavailable(service):
    """The object a colocated ingress holds: after its engine process is killed, Serve's health
    check (the ingress' check_health calls the model's) fails, so Serve restarts the replica, and
    a request in the meantime fails UNAVAILABLE instead of hanging."""
    from services.config import parse_config
    from services.local_models import local_model_handles

    model = parse_config(process_config()).models[0]
    (handle,) = local_model_handles({LM: (model.to_spec(service.artifacts), 1, False)}).values()
    server = handle._server
    try:
        handle.check_health()
        assert asyncio.run(handle.generate.remote(sixteen_requests()[1], time.time())).completion.tokens
        server.generation._proc.kill()
        deadline = time.time() + 30
        while server.ready():
            assert time.time() < deadline, "the replica did not notice its engine process died"
            time.sleep(0.05)
        with pytest.raises(Unavailable):
            handle.check_health()
        with pytest.raises(Unavailable):
            asyncio.run(handle.generate.remote(sixteen_requests()[1], time.time()))
        assert grpc_status(Unavailable("gone"))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        server.generation.stop()
        server.loop.stop()
