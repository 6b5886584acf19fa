"""The JSON mirror of every RPC (POST /v1/steering/<Rpc>) against the same requests over gRPC, the
HTTP error mapping (status, body naming the field), the body cap, the bearer token, /openapi.json."""

from __future__ import annotations

import math

import base64
import json
import re
import time

import jsonschema
import pytest
import requests
from google.protobuf import json_format
from steering.v1 import steering_pb2 as pb

from services.errors import grpc_status
from services.http.errors import HttpError
from tests.services.helpers import HTTP_MAX_BODY_BYTES, IMAGE, IMG_SAE, LM, LM_LABELS, LM_SAE, VLM, png_bytes

TIMEOUT_S = 120
RED = LM_LABELS["color:red"]


def post(service, path: str, body, **kwargs) -> requests.Response:
    return requests.post(service.http_url + path, json=body, timeout=TIMEOUT_S, **kwargs)


def without_timings(d: dict) -> dict:
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in d.items() if k != "timings"}


def assert_same(a, b, path: str = "") -> None:
    """Equal JSON, floats to 1e-5 relative: two runs of one request may share their steps with other
    rows (the engine's batches are continuous), which moves float32 results by an ulp or so; ids,
    texts, latent indices and every other field must be equal."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, (path, a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), (path, len(a), len(b))
        for n, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{n}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def steered_request(**extra) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=LM, prompt="the cat sat", seed=7, include_default=True, return_logprobs=2, **extra)
    request.params.max_new_tokens = 5
    request.plan.edits.add(sae=LM_SAE, op=pb.EDIT_OP_SET, latents=[RED], value=8.0)
    request.return_latents.top_k = 3
    return request


UNARY_CASES = {
    "Generate": steered_request(),
    "GenerateMultimodal": pb.GenerateMultimodalRequest(model=VLM, prompt="what", image=png_bytes(3), seed=1, params=pb.GenerationParams(max_new_tokens=3)),
    "GenerateImage": pb.GenerateImageRequest(
        model=IMAGE, prompt="a cat", seed=2, num_inference_steps=1, height=32, width=32, include_default=True,
        plan=pb.InterventionPlan(edits=[pb.LatentEdit(sae=IMG_SAE, op=pb.EDIT_OP_ADD, latents=[7], value=20.0)]),
        return_latents=pb.LatentReadout(top_k=2),
    ),
    "Encode": pb.EncodeRequest(model=LM, text="the red cat", top_k=3),
    "ListModels": pb.ListModelsRequest(),
    "SearchFeatures": pb.SearchFeaturesRequest(model=LM, query="color"),
}


@pytest.mark.parametrize("rpc", list(UNARY_CASES))
def test_json_mirror_answers_what_grpc_answers(service, stub, rpc):
    """The request's proto JSON over HTTP gets the gRPC response's proto JSON (timings aside)."""
    request = UNARY_CASES[rpc]
    over_grpc = json_format.MessageToDict(getattr(stub, rpc)(request, timeout=TIMEOUT_S))
    response = post(service, f"/v1/steering/{rpc}", json_format.MessageToDict(request))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert_same(without_timings(response.json()), without_timings(over_grpc))
    if rpc == "GenerateImage":  # bytes travel as base64
        png = base64.b64decode(response.json()["png"])
        assert png.startswith(b"\x89PNG") and png != base64.b64decode(response.json()["defaultPng"])


def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    events, event, data = [], "message", ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif not line and data:
            events.append((event, json.loads(data)))
            event, data = "message", ""
    return events


def test_generate_stream_is_server_sent_events_of_the_grpc_stream(service, stub):
    request = steered_request()
    over_grpc = [json_format.MessageToDict(m) for m in stub.GenerateStream(request, timeout=TIMEOUT_S)]
    with requests.post(service.http_url + "/v1/steering/GenerateStream", json=json_format.MessageToDict(request), stream=True, timeout=TIMEOUT_S) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert {e for e, _ in events} == {"message"}
    over_http = [m for _, m in events]
    assert len(over_http) == len(over_grpc) == 6  # 5 tokens, then the final response
    assert [m.get("token") for m in over_http[:-1]] == [m.get("token") for m in over_grpc[:-1]]
    assert [m.get("runningRisk") for m in over_http[:-1]] == pytest.approx([m.get("runningRisk") for m in over_grpc[:-1]])
    assert without_timings(over_http[-1]["final"]) == without_timings(over_grpc[-1]["final"])
    assert over_http[-1]["final"]["completion"]["text"] == "".join(m["token"]["text"] for m in over_http[:-1])


# -- errors -------------------------------------------------------------------------------------
ERROR_CASES = {
    # name: (path, body, HTTP status, gRPC code name, field)
    "unknown model": ("/v1/steering/Generate", {"model": "nope", "prompt": "x"}, 404, "NOT_FOUND", "model"),
    "no model": ("/v1/steering/Encode", {"text": "x"}, 400, "INVALID_ARGUMENT", "model"),
    "latent out of range": (
        "/v1/steering/Generate",
        {"model": LM, "prompt": "x", "plan": {"edits": [{"sae": LM_SAE, "op": "EDIT_OP_SET", "latents": [99], "value": 1}]}},
        400, "INVALID_ARGUMENT", "plan.edits[0].latents",
    ),
    "unknown SAE": ("/v1/steering/SearchFeatures", {"model": LM, "sae": "nope"}, 404, "NOT_FOUND", "sae"),
    "bad enum": ("/v1/steering/Generate", {"model": LM, "plan": {"edits": [{"op": "EDIT_OP_PAINT"}]}}, 400, "INVALID_ARGUMENT", "plan.edits[0].op"),
    "unknown field": ("/v1/steering/Generate", {"model": LM, "params": {"maxTokens": 3}}, 400, "INVALID_ARGUMENT", "params.maxTokens"),
    "over a limit": ("/v1/steering/Generate", {"model": LM, "prompt": "x", "params": {"maxNewTokens": 500}}, 413, "RESOURCE_EXHAUSTED", "params.max_new_tokens"),
    "stream over a limit": ("/v1/steering/GenerateStream", {"model": LM, "prompt": "x", "params": {"maxNewTokens": 500}}, 413, "RESOURCE_EXHAUSTED", "params.max_new_tokens"),
    "stream of an image model": ("/v1/steering/GenerateStream", {"model": IMAGE, "prompt": "x"}, 400, "INVALID_ARGUMENT", "model"),
    "not an object": ("/v1/steering/Generate", [1, 2], 400, "INVALID_ARGUMENT", "body"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_map_to_http_statuses_with_the_field(service, case):
    path, body, status, code, field = ERROR_CASES[case]
    response = post(service, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, field)
    assert error["message"].startswith(f"{field}: ")


def test_invalid_json_and_oversized_bodies(service):
    bad = requests.post(service.http_url + "/v1/steering/Generate", data=b"{not json", timeout=TIMEOUT_S)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "body"
    big = {"model": LM, "prompt": "x" * HTTP_MAX_BODY_BYTES}
    too_big = post(service, "/v1/steering/Generate", big)
    assert too_big.status_code == 413
    assert too_big.json()["error"] == {**too_big.json()["error"], "code": "RESOURCE_EXHAUSTED", "param": "body"}
    # Chunked (no Content-Length): counted as it arrives.
    chunks = (json.dumps(big).encode()[i : i + 65536] for i in range(0, HTTP_MAX_BODY_BYTES + 100, 65536))
    chunked = requests.post(service.http_url + "/v1/steering/Generate", data=chunks, timeout=TIMEOUT_S)
    assert chunked.status_code == 413 and chunked.json()["error"]["param"] == "body"
    assert post(service, "/v1/steering/Generate", {"model": LM, "prompt": "x", "params": {"maxNewTokens": 1}}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/steering/Generate", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_bodies_a_web_page_could_send_cross_origin_are_refused(service, path, kind):
    """Forms and plain text (what another site's page may POST without a CORS preflight) get 415."""
    body = json.dumps({"model": LM, "prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    refused = requests.post(service.http_url + path, data=body, headers={"Content-Type": kind}, timeout=TIMEOUT_S)
    assert refused.status_code == 415 and refused.json()["error"]["param"] == "content-type"
    assert "access-control-allow-origin" not in refused.headers


def test_overload_is_429_and_deadline_504_through_the_shared_status_mapping():
    """The statuses no tiny test model produces on demand, through services.errors.grpc_status."""
    from ray.serve.exceptions import BackPressureError

    assert HttpError.from_grpc(*grpc_status(BackPressureError(num_queued_requests=9, max_queued_requests=8))).status == 429
    assert HttpError.from_grpc(*grpc_status(TimeoutError())).status == 504
    from services.errors import Unavailable

    assert HttpError.from_grpc(*grpc_status(Unavailable("restarting", field="model"))).body()["error"]["param"] == "model"


# -- bearer token -------------------------------------------------------------------------------
SECURE_APP = "http-secure"
TOKEN = "http-s3cret-token-91ab"


@pytest.fixture(scope="module")
def secure_prefix(service):
    """A second application on the same Serve: the real ingress with a bearer token, on the main
    application's model deployments, at the HTTP route prefix /http-secure."""
    from ray import serve

    from services.ingress import SteeringIngress

    handles = {name: serve.get_deployment_handle(f"model-{name}", app_name="steering") for name in (LM, VLM, IMAGE)}
    ingress = SteeringIngress.options(name="ingress", ray_actor_options={"num_cpus": 0.05}).bind(handles, {"bearer_token": TOKEN})
    serve.run(ingress, name=SECURE_APP, route_prefix=f"/{SECURE_APP}", blocking=False)
    prefix = f"/{SECURE_APP}"
    try:
        deadline = time.time() + TIMEOUT_S
        while requests.get(service.http_url + prefix + "/openapi.json", timeout=10).status_code != 200:
            assert time.time() < deadline, "the secured application did not come up"
            time.sleep(0.5)
        yield prefix
    finally:
        serve.delete(SECURE_APP, _blocking=True)


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/v1/steering/Generate", {"model": LM, "prompt": "x", "params": {"maxNewTokens": 1}}),
        ("POST", "/v1/steering/GenerateStream", {"model": LM, "prompt": "x", "params": {"maxNewTokens": 1}}),
        ("POST", "/v1/steering/ListModels", {}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": LM, "prompt": "x", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"model": LM, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": True}),
    ],
)
def test_bearer_token_applies_to_http_as_to_grpc(service, secure_prefix, method, path, body):
    url = service.http_url + secure_prefix + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"bearer {TOKEN}"}):
        refused = requests.request(method, url, json=body, headers=headers, timeout=TIMEOUT_S)
        assert refused.status_code == 401, (headers, refused.text)
        assert refused.json()["error"]["param"] == "authorization" and TOKEN not in refused.text
    ok = requests.request(method, url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT_S)
    assert ok.status_code == 200, ok.text
    # The main application has no token configured: the same request needs none there.
    assert requests.request(method, service.http_url + path, json=body, timeout=TIMEOUT_S).status_code == 200


def _non_loopback_addresses() -> list[str]:
    """This machine's IPv4 addresses outside 127.0.0.0/8 (from the kernel's interface table)."""
    import subprocess

    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return []
    return [a.split("/")[0] for a in re.findall(r"inet (\S+)", out) if not a.startswith("127.")]


def test_http_listens_on_loopback_by_default(service):
    import socket
    from urllib.parse import urlparse

    from services.config import parse_config
    from services.k8s_render import render_serve_config

    config = parse_config({"models": [{"name": "m", "kind": "llava", "demo": True}]})
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8000)
    assert render_serve_config(config, base_dir="/app")["http_options"] == {"host": "0.0.0.0", "port": 8000}  # a cluster's pods
    with pytest.raises(Exception, match="http.port"):
        parse_config({"http": {"port": 0}, "models": [{"name": "m", "kind": "llava", "demo": True}]})

    # The session service runs with the default host: it answers on loopback, and nothing answers
    # on the machine's other addresses.
    port = urlparse(service.http_url).port
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    addresses = _non_loopback_addresses()
    if not addresses:
        pytest.skip("no non-loopback IPv4 address to probe (or no `ip` command)")
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


# -- OpenAPI ------------------------------------------------------------------------------------
def test_openapi_document_lists_every_rpc_and_its_schemas_validate_real_responses(service):
    doc = requests.get(service.http_url + "/openapi.json", timeout=TIMEOUT_S).json()
    rpcs = set(pb.DESCRIPTOR.services_by_name["Steering"].methods_by_name)
    assert {f"/v1/steering/{rpc}" for rpc in rpcs} | {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]

    def validator(name: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}})

    body = json_format.MessageToDict(steered_request())
    request_ref = doc["paths"]["/v1/steering/Generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert request_ref == "#/components/schemas/steering.v1.GenerateRequest"
    validator("steering.v1.GenerateRequest").validate(body)
    response = post(service, "/v1/steering/Generate", body).json()
    validator("steering.v1.GenerateResponse").validate(response)
    with pytest.raises(jsonschema.ValidationError):
        validator("steering.v1.GenerateRequest").validate({**body, "plan": {"edits": [{"op": "EDIT_OP_PAINT"}]}})


def test_the_readme_curl_commands_run(service):
    import shutil
    import subprocess

    from tests.services.test_readme import blocks, for_tests

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (commands,) = [b for b in blocks("sh") if "curl" in b]
    script = for_tests(commands, service.target).replace("localhost:8000", service.http_url.removeprefix("http://"))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    generated, _ = json.JSONDecoder().raw_decode(done.stdout)  # the first command's response
    assert generated["completion"]["text"] and generated["defaultCompletion"]["text"]
    assert done.stdout.count("data: {") == 9  # the stream: 8 tokens, then the final response
    assert '"openapi":' in done.stdout
