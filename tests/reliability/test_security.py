"""Security properties (docs/threat-model.md): requests name only configured models and SAEs, never
files; no file load unpickles; the gRPC proxy caps message size; an optional bearer token guards
every Steering RPC."""

from __future__ import annotations

import ast
import errno
import json
import os
from collections import OrderedDict
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services.client import MAX_MESSAGE_BYTES, Generation, SteeringClient, edit
from services.config import DEFAULT_MAX_MESSAGE_BYTES
from tests.reliability.support import CHANNEL_OPTIONS, RPCS, call
from tests.services.helpers import IMAGE, LM, LM_SAE, VLM, png_bytes

REPO = Path(__file__).resolve().parents[2]
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.target, options=CHANNEL_OPTIONS) as channel:
        yield steering_pb2_grpc.SteeringStub(channel)


# -- names, never paths ------------------------------------------------------------------------------
def naming_requests(name: str) -> list[tuple[str, object, str]]:
    """(rpc, request, field) for every request field that names a model or an SAE, set to ``name``."""
    good = dict(generation=Generation(max_new_tokens=1))
    return [
        ("Generate", SteeringClient.text_request(name, "the cat", **good), "model"),
        ("GenerateStream", SteeringClient.text_request(name, "the cat", **good), "model"),
        ("GenerateMultimodal", SteeringClient.text_request(name, "what", image=png_bytes(1), **good), "model"),
        ("GenerateImage", pb.GenerateImageRequest(model=name, prompt="a cat", num_inference_steps=1), "model"),
        ("Encode", pb.EncodeRequest(model=name, text="the"), "model"),
        ("SearchFeatures", pb.SearchFeaturesRequest(model=name), "model"),
        ("Generate", SteeringClient.text_request(LM, "the cat", edits=[edit(name, "set", 1, value=1.0)], **good), "plan.edits[0].sae"),
        ("Generate", SteeringClient.text_request(LM, "the cat", return_latents=[name], **good), "return_latents.saes[0]"),
        ("GenerateImage", pb.GenerateImageRequest(model=IMAGE, prompt="a cat", num_inference_steps=1,
                                                  plan=pb.InterventionPlan(edits=[edit(name, "add", 1, value=1.0)])), "plan.edits[0].sae"),
        ("Encode", pb.EncodeRequest(model=LM, text="the", saes=[name]), "saes[0]"),
        ("SearchFeatures", pb.SearchFeaturesRequest(model=LM, sae=name), "sae"),
    ]


def test_requests_name_only_configured_models_and_saes_never_files(service, stub, tmp_path):
    """Paths (absolute, relative, traversing, the served files' own paths, a FIFO) are NOT_FOUND
    names: nothing is opened (a reader opening the FIFO would block, and show up as its reader),
    and the details list configured names without revealing where files live."""
    fifo = tmp_path / "canary.fifo"
    os.mkfifo(fifo)
    artifacts = service.artifacts
    names = ["/etc/passwd", "../models/x", "../../../../etc/shadow", "lm/../lm", "~/.ssh/id_rsa", "file:///etc/passwd",
             str(artifacts / "lm"), "lm", str(artifacts / "saes" / LM_SAE), f"saes/{LM_SAE}", str(fifo), "\\\\server\\share"]
    tried = 0
    for name in names:
        for rpc, request, field in naming_requests(name):
            if name == "lm" and field == "model":
                continue  # "lm" IS a configured model name (and "saes/res" is not an SAE name)
            outcome = call(stub, rpc, request, timeout=30)
            tried += 1
            assert outcome.code == NOT_FOUND and outcome.field == field, (rpc, name, outcome.code, outcome.details)
            rest = outcome.details.replace(repr(name), "")  # the details echo the name asked for, and list the configured ones
            assert str(artifacts) not in rest and "/etc" not in rest, outcome.details
    with pytest.raises(OSError) as no_reader:  # O_NONBLOCK write-open of a FIFO fails with ENXIO when nobody reads it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert no_reader.value.errno == errno.ENXIO
    assert tried >= 120


# -- no unpickling -----------------------------------------------------------------------------------
SOURCE_DIRS = ("sae_runtime", "services", "benchmarks")


def calls_in_source():
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path.relative_to(REPO), node


def dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "?")  # "?": the chain starts at a call, subscript...
    return ".".join(reversed(parts))


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


#: The one unpickling allowed: messages between a replica and the engine process it started itself
#: (engine.separate_process), over a socket pair created before the child exists. No file, request
#: or network bytes reach it (checked below); Ray pickles every message between its own processes alike.
INTERNAL_CHANNEL = (Path("sae_runtime/engine/process.py"), "pickle.loads")


def test_every_torch_load_passes_weights_only_true_and_nothing_else_unpickles():
    torch_loads, problems, internal = 0, [], 0
    for path, node in calls_in_source():
        name = dotted(node.func)
        where = f"{path}:{node.lineno} {name}"
        if (path, name) == INTERNAL_CHANNEL:
            internal += 1
        elif name == "torch.load" or name.endswith(".load") and keyword(node, "weights_only") is not None:
            torch_loads += 1
            value = keyword(node, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where} without weights_only=True")
        elif name.split(".")[-1] in ("loads", "load") and name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "marshal", "shelve"):
            problems.append(f"{where}: unpickles")
        elif name in ("torch.jit.load", "torch.package.PackageImporter", "shelve.open"):
            problems.append(f"{where}: executes or unpickles serialized code")
        elif name in ("numpy.load", "np.load") and isinstance(keyword(node, "allow_pickle"), ast.Constant) and keyword(node, "allow_pickle").value:
            problems.append(f"{where} with allow_pickle=True")
        elif name == "yaml.load" and "Safe" not in ast.unparse(keyword(node, "Loader") or ast.Constant(None)):
            problems.append(f"{where} without a safe Loader")
        elif name in ("eval", "exec"):
            problems.append(f"{where}: evaluates text")
        value = keyword(node, "trust_remote_code")
        if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
            problems.append(f"{where} with trust_remote_code (runs code from model files)")
    assert torch_loads >= 1  # the scan does see the one .pt reader
    assert internal == 1
    assert problems == []


def test_the_engine_process_channel_reaches_only_the_child_it_started():
    """The socket the engine process' messages are unpickled from is one end of a socket pair
    whose other end goes only to the child (pass_fds); the module opens no other socket."""
    tree = ast.parse((REPO / INTERNAL_CHANNEL[0]).read_text())
    names = {dotted(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert "socket.socketpair" in names
    assert not {n for n in names if n.split(".")[-1] in ("bind", "listen", "connect", "accept", "create_connection", "Listener", "Client")}


class _Payload:
    """Pickles to a call of ``Path.touch(marker)``: running it leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def dictionary_learning_sae(directory: Path, state: dict) -> Path:
    """An SAE in saprmarks/dictionary_learning's layout (config.json + ae.pt) for the tiny LM (d_in 32)."""
    directory.mkdir(parents=True)
    torch.save(OrderedDict(state), directory / "ae.pt")
    trainer = {"trainer_class": "StandardTrainer", "dict_class": "AutoEncoder", "activation_dim": 32, "dict_size": 64,
               "layer": 0, "lm_name": "tiny", "submodule_name": "resid_0"}
    (directory / "config.json").write_text(json.dumps({"trainer": trainer}))
    return directory


def test_a_malicious_pickle_in_a_dictionary_learning_ae_pt_is_refused_and_never_run(service, tmp_path):
    """The replica's own load path (config -> ModelSpec -> build_backend) refuses the file, naming it;
    the same path loads a benign file in the same place, and the payload is live (it runs under a
    plain torch.load), so the refusal is weights_only at work."""
    from sae_runtime.errors import FormatError
    from sae_runtime.backends.registry import build_backend
    from services.config import parse_config

    marker = tmp_path / "pwned"
    benign = {"bias": torch.zeros(32), "encoder.weight": torch.randn(64, 32), "encoder.bias": torch.zeros(64),
              "decoder.weight": torch.randn(32, 64)}
    evil_dir = dictionary_learning_sae(tmp_path / "evil", {**benign, "bias": _Payload(marker)})
    good_dir = dictionary_learning_sae(tmp_path / "good", benign)

    def spec(sae_dir: Path):
        config = parse_config({"models": [{"name": "m", "kind": "causal_lm", "path": str(service.artifacts / "lm"),
                                           "saes": [{"name": "d", "path": str(sae_dir), "hook_name": "blocks.0.hook_resid_post"}]}]})
        return config.models[0].to_spec(tmp_path)

    with pytest.raises(FormatError) as refused:
        build_backend(spec(evil_dir))
    assert refused.value.field == str(evil_dir / "ae.pt") and "weights_only=True" in str(refused.value)
    assert not marker.exists()
    assert build_backend(spec(good_dir)).info().saes[0].d_sae == 64
    torch.load(evil_dir / "ae.pt", weights_only=False)  # the positive control: unpickling runs the payload
    assert marker.exists()


# -- message size ------------------------------------------------------------------------------------
def test_an_oversized_message_is_refused_by_the_proxy_and_the_service_still_answers(service, stub):
    assert DEFAULT_MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES  # the server caps what the client may send
    huge = SteeringClient.text_request(VLM, "what", image=b"\x89PNG" + b"\0" * (DEFAULT_MAX_MESSAGE_BYTES + 1024),
                                       generation=Generation(max_new_tokens=1))
    options = [("grpc.max_send_message_length", 4 * DEFAULT_MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(service.target, options=options) as channel:
        outcome = call(steering_pb2_grpc.SteeringStub(channel), "GenerateMultimodal", huge, timeout=60)
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in outcome.details, outcome.details
    below_cap = SteeringClient.text_request(VLM, "what", image=png_bytes(1) + b"\0" * (2 << 20), generation=Generation(max_new_tokens=1))
    inside = call(stub, "GenerateMultimodal", below_cap, timeout=60)  # reaches the model: its own image limit answers
    assert inside.code == grpc.StatusCode.RESOURCE_EXHAUSTED and inside.field == "image", inside.details
    assert call(stub, "Generate", SteeringClient.text_request(LM, "the", generation=Generation(max_new_tokens=1))).code == grpc.StatusCode.OK


# -- bearer token ------------------------------------------------------------------------------------
SECURE_APP = "secure"
TOKEN_ENV = "STEERING_RELIABILITY_TOKEN"
TOKEN = "s3cret-reliability-token-7f3a"


@pytest.fixture(scope="module")
def secure_app(service):
    """A second application on the same Serve: the real SteeringIngress with ``auth:
    {bearer_token_env: ...}`` (the variable set in its replica's environment), routing to the main
    application's model deployments. Clients pick it with the ``application`` metadata key."""
    from ray import serve

    from services.ingress import SteeringIngress

    handles = {name: serve.get_deployment_handle(f"model-{name}", app_name="steering") for name in (LM, VLM, IMAGE)}
    ingress = SteeringIngress.options(
        name="ingress", ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": {TOKEN_ENV: TOKEN}}}
    ).bind(handles, {"bearer_token_env": TOKEN_ENV})
    serve.run(ingress, name=SECURE_APP, route_prefix=f"/{SECURE_APP}", blocking=False)
    try:
        yield (("application", SECURE_APP),)
    finally:
        serve.delete(SECURE_APP, _blocking=True)


GOOD_REQUESTS = {
    "Generate": SteeringClient.text_request(LM, "the cat", generation=Generation(max_new_tokens=1)),
    "GenerateStream": SteeringClient.text_request(LM, "the cat", generation=Generation(max_new_tokens=1)),
    "GenerateMultimodal": SteeringClient.text_request(VLM, "what", image=png_bytes(1), generation=Generation(max_new_tokens=1)),
    "GenerateImage": pb.GenerateImageRequest(model=IMAGE, prompt="a cat", num_inference_steps=1),
    "Encode": pb.EncodeRequest(model=LM, text="the cat"),
    "ListModels": pb.ListModelsRequest(),
    "SearchFeatures": pb.SearchFeaturesRequest(model=LM, query="color"),
}
BAD_CREDENTIALS = {
    "none": (),
    "wrong token": (("authorization", "Bearer not-the-token"),),
    "token without the scheme": (("authorization", TOKEN),),
    "lower-case scheme": (("authorization", f"bearer {TOKEN}"),),
    "token with a suffix": (("authorization", f"Bearer {TOKEN}x"),),
    "token prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "another header": (("x-api-key", TOKEN),),
}


def test_every_rpc_without_the_right_bearer_token_is_unauthenticated(service, stub, secure_app):
    assert set(GOOD_REQUESTS) == set(RPCS)
    for rpc, request in GOOD_REQUESTS.items():
        for label, credentials in BAD_CREDENTIALS.items():
            outcome = call(stub, rpc, request, metadata=(*secure_app, *credentials), timeout=30)
            assert outcome.code == UNAUTHENTICATED and outcome.field == "authorization", (rpc, label, outcome.details)
            assert TOKEN not in outcome.details and TOKEN[:8] not in outcome.details
        ok = call(stub, rpc, request, metadata=(*secure_app, ("authorization", f"Bearer {TOKEN}")), timeout=60)
        assert ok.code == grpc.StatusCode.OK, (rpc, ok.details)


def test_authentication_comes_before_any_model_work(service, stub, secure_app):
    """An unauthenticated request is refused as such even when it is also malformed or names an
    unknown model: it learns nothing about models or fields, and no model sees it."""
    for request in (SteeringClient.text_request("no-such-model", "x"),
                    SteeringClient.text_request(LM, "", edits=[edit("nope", "set", 10**6, value=float("nan"))])):
        outcome = call(stub, "Generate", request, metadata=(*secure_app, ("authorization", "Bearer wrong")))
        assert outcome.code == UNAUTHENTICATED, outcome.details
    authed = call(stub, "Generate", SteeringClient.text_request("no-such-model", "x"),
                  metadata=(*secure_app, ("authorization", f"Bearer {TOKEN}")))
    assert authed.code == NOT_FOUND and authed.field == "model"


def test_health_stays_open_for_probes_and_the_open_app_needs_no_token(service, stub, secure_app):
    with grpc.insecure_channel(service.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30, metadata=secure_app)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    open_app = call(stub, "Generate", GOOD_REQUESTS["Generate"], metadata=(("application", "steering"),))
    assert open_app.code == grpc.StatusCode.OK, open_app.details
