"""``ingress.colocate_models``: the models served inside the ingress replica answer exactly as their
own deployments do, through the same gRPC API, with one deployment in the application."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from steering.v1 import steering_pb2 as pb

from services.client import Generation, SteeringClient, edit, plan
from tests.services.helpers import IMAGE, IMG_LABELS, IMG_SAE, LM, LM_SAE, free_port, second_application, service_config
from tests.services.test_errors_and_batching import same_result

COLOCATED_APP = "colocated"
#: While two applications run, a gRPC call names its application.
MAIN = (("application", "steering"),)
TIMEOUT_S = 120


def colocated_config(models: tuple[str, ...] = (LM, IMAGE)) -> dict:
    """The session's config with ``models`` of it colocated in the ingress, as another application."""
    config = service_config(free_port())
    config |= {"app_name": COLOCATED_APP, "ingress": {"num_cpus": 0.05, "colocate_models": True},
               "models": [m for m in config["models"] if m["name"] in models]}
    return config


@pytest.fixture(scope="module")
def colocated(service):
    """Metadata that routes a call to a second application on the session's Serve: ``lm`` and
    ``img`` of the session's config, colocated in that application's ingress."""
    with second_application(service, colocated_config()) as metadata:
        yield metadata


def steered_request(tokens: int = 6, include_default: bool = True) -> pb.GenerateRequest:
    return SteeringClient.text_request(LM, "the cat sat", seed=3, edits=[edit(LM_SAE, "set", 3, 5, value=6.0)],
                                       generation=Generation(max_new_tokens=tokens), include_default=include_default)


def test_the_application_is_one_deployment_that_lists_its_models(colocated, stub):
    from ray import serve

    assert set(serve.status().applications[COLOCATED_APP].deployments) == {"ingress"}
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S, metadata=colocated)
    assert [m.name for m in listed.models] == [LM, IMAGE]
    assert [s.name for s in listed.models[0].saes] == [LM_SAE]


def test_generate_and_stream_equal_the_model_deployment(colocated, stub):
    request = steered_request()
    want = stub.Generate(request, timeout=TIMEOUT_S, metadata=MAIN)  # the session's app: a deployment per model
    got = stub.Generate(request, timeout=TIMEOUT_S, metadata=colocated)
    same_result(got, want)
    assert [t.id for t in got.completion.tokens] != [t.id for t in got.default_completion.tokens]  # the clamp steers
    streamed = list(stub.GenerateStream(request, timeout=TIMEOUT_S, metadata=colocated))
    assert [m.token.id for m in streamed[:-1]] == [t.id for t in want.completion.tokens]
    same_result(streamed[-1].final, want)


def test_images_come_from_the_colocated_image_model(colocated, stub):
    edits = [edit(IMG_SAE, "set", IMG_LABELS["color:red"], value=5.0)]
    request = pb.GenerateImageRequest(model=IMAGE, prompt="a cat", num_inference_steps=1, seed=4, plan=plan(edits), include_default=True)
    got = stub.GenerateImage(request, timeout=TIMEOUT_S, metadata=colocated)
    want = stub.GenerateImage(request, timeout=TIMEOUT_S, metadata=MAIN)
    assert got.png == want.png and got.default_png == want.default_png
    assert got.png != got.default_png  # the clamp changed the image


def test_errors_map_to_the_same_statuses(colocated, stub):
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Generate(pb.GenerateRequest(model="lm-dicts", prompt="x"), timeout=TIMEOUT_S, metadata=colocated)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "lm-dicts" in unknown.value.details()
    bad = SteeringClient.text_request(LM, "the", edits=[edit(LM_SAE, "set", 10**6, value=1.0)], generation=Generation(max_new_tokens=1))
    with pytest.raises(grpc.RpcError) as invalid:
        stub.Generate(bad, timeout=TIMEOUT_S, metadata=colocated)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "plan.edits[0].latents" in invalid.value.details()
    wrong_kind = pb.GenerateImageRequest(model=LM, prompt="x", num_inference_steps=1)
    with pytest.raises(grpc.RpcError) as kind:
        stub.GenerateImage(wrong_kind, timeout=TIMEOUT_S, metadata=colocated)
    assert kind.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Generate(steered_request(1), timeout=TIMEOUT_S, metadata=colocated).completion.tokens  # still serving


def test_a_local_stream_closed_early_leaves_the_engine(service):
    """The handle the colocated ingress calls: a stream its caller stops reading is cancelled in the
    engine (no row left running), and the server keeps answering."""
    from services.config import parse_config
    from services.local_models import local_model_handles

    model = parse_config(colocated_config((LM,))).models[0]
    (handle,) = local_model_handles({LM: (model.to_spec(service.artifacts), 1, False)}).values()
    server = handle._server
    request = steered_request(tokens=24, include_default=False)

    async def first_then_close() -> tuple[pb.GenerateStreamResponse, pb.GenerateResponse]:
        stream = handle.options(stream=True).generate_stream.remote(request, time.time())
        first = await stream.__anext__()
        await stream.aclose()
        # Closing the stream itself asked the engine to cancel the row: not a finalizer that the
        # event loop runs later, after the next request was submitted (that raced with the step).
        assert all(run.cancel_requested for run in server.engine._running)
        # the stream's row left: the next request runs alone (batch_size counts the rows it stepped with)
        return first, await handle.generate.remote(steered_request(tokens=2, include_default=False), time.time())

    try:
        first, after = asyncio.run(first_then_close())
        assert first.HasField("token") and server.engine.running_rows == 0 and server.engine.waiting == 0
        assert after.timings.batch_size == 1 and after.completion.tokens[0].id == first.token.id
        info = asyncio.run(handle.model_info.remote())  # a sync method, on a worker thread
        assert info.name == LM
    finally:
        server.loop.stop()


def test_the_ingress_stream_closed_by_its_reader_cancels_the_row_at_once(service):
    """The colocated ingress's GenerateStream, closed at its yield (as the HTTP event stream does when
    its client leaves): the model's row is asked to leave during the close, and the next request
    runs alone."""
    from services.config import parse_config
    from services.http.calls import HttpCallContext
    from services.ingress import SteeringIngress

    model = parse_config(colocated_config((LM,))).models[0]
    # the class as written, under the ASGI wrapper that @serve.ingress puts around it
    ingress_class = next(k for k in SteeringIngress.func_or_class.__mro__[1:] if k.__name__ == "SteeringIngress")
    ingress = ingress_class({}, None, None, {LM: (model.to_spec(service.artifacts), 1, False)})
    server = ingress._models[LM]._server

    async def first_then_close() -> tuple[pb.GenerateStreamResponse, pb.GenerateResponse]:
        stream = ingress.GenerateStream(steered_request(tokens=24, include_default=False), HttpCallContext({}))
        first = await stream.__anext__()
        await stream.aclose()
        assert all(run.cancel_requested for run in server.engine._running)
        after = await ingress.Generate(steered_request(tokens=2, include_default=False), HttpCallContext({}))
        return first, after

    try:
        first, after = asyncio.run(first_then_close())
        assert first.HasField("token") and server.engine.running_rows == 0
        assert after.timings.batch_size == 1 and after.completion.tokens[0].id == first.token.id
    finally:
        server.loop.stop()
