"""Config schema: the shipped config validates, bad configs fail naming the field, and the rendered
Ray Serve config is accepted by Serve's own schema and carries the config through unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from sae_runtime.backends.spec import Limits
from services.config import DEFAULT_CONFIG, GRPC_SERVICER_FUNCTIONS, ConfigError, load_config, parse_config
from services.k8s_render import APP_IMPORT_PATH, render_serve_config


def minimal(**model_overrides) -> dict:
    model = {"name": "lm", "kind": "causal_lm", "path": "models/lm", "saes": [{"name": "res", "path": "saes/res"}]}
    model.update(model_overrides)
    return {"models": [model]}


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_shipped_default_config_validates_and_resolves_paths_against_its_directory():
    config = load_config(DEFAULT_CONFIG)
    assert config.grpc.port == 9000
    assert [m.name for m in config.models] == ["demo-lm", "demo-llava", "demo-sdxl-turbo"]
    assert [m.demo for m in config.models] == [False, False, False]  # trained demos, no random ones
    assert sum(m.resources.num_cpus for m in config.models) + config.ingress.num_cpus <= 2  # fits 2 cores
    repo = DEFAULT_CONFIG.parent.parent
    for model in config.models:
        spec = model.to_spec(DEFAULT_CONFIG.parent)
        assert Path(spec.path).is_relative_to(repo / "models") and Path(spec.path).is_dir()
        assert spec.saes and all(Path(s.path).is_relative_to(repo / "models") for s in spec.saes)


def test_model_spec_carries_every_setting(tmp_path):
    data = minimal(
        description="tiny",
        dtype="bfloat16",
        risk_probe="probe",
        limits={"max_new_tokens": 7, "max_edits": 3},
        saes=[{"name": "res", "path": "saes/res", "format": "saelens", "hook_name": "blocks.0.hook_resid_post"},
              {"name": "hub", "hub_id": "org/sae-release"}],
    )
    spec = parse_config(data).models[0].to_spec(tmp_path)
    assert spec.name == "lm" and spec.kind == "causal_lm" and spec.dtype == "bfloat16" and spec.description == "tiny"
    assert spec.path == str(tmp_path / "models" / "lm")
    assert spec.risk_probe == str(tmp_path / "probe")
    assert spec.limits == Limits(max_new_tokens=7, max_edits=3)
    res, hub = spec.saes
    assert (res.name, res.path, res.format, res.hook_name) == ("res", str(tmp_path / "saes/res"), "saelens", "blocks.0.hook_resid_post")
    assert (hub.name, hub.path, hub.format) == ("hub", "org/sae-release", None)  # hub ids are not paths


@pytest.mark.parametrize(
    "data, expected",
    [
        (minimal(kind="bert"), "models.0.kind"),
        (minimal(hub_id="org/x"), "exactly one of 'path' or 'hub_id'"),
        (minimal(name="has space"), "models.0.name"),
        (minimal(saes=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]), "duplicate SAE names: a"),
        (minimal(engine={"max_running_rows": 0}), "models.0.engine.max_running_rows"),
        (minimal(engine={"max_running_rows": 8}, max_ongoing_requests=4), "max_ongoing_requests must be >="),
        (minimal(device="cuda"), "num_gpus > 0"),
        (minimal(device="tpu"), "models.0.device"),
        (minimal(engine={"max_running_row": 4}), "models.0.engine.max_running_row: Extra inputs are not permitted"),
        (minimal(batching={"max_batch_size": 4}), "models.0.batching: Extra inputs are not permitted"),
        (minimal(autoscaling={"min_replicas": 3, "max_replicas": 2}), "min_replicas must be <= max_replicas"),
        (minimal(resources={"num_cpus": -1}), "models.0.resources.num_cpus"),
        ({**minimal(), "grpc": {"port": 70000}}, "grpc.port"),
        ({**minimal(), "auth": {"bearer_token": "long-enough-token", "bearer_token_env": "TOKEN"}}, "at most one"),
        ({"models": []}, "models: "),
        ({"models": minimal()["models"] * 2}, "duplicate model names: lm"),
        (["not", "a", "mapping"], "top level must be a mapping"),
        (minimal(kind="causal_lm", demo=True, path=None, saes=[]), "demo: true is available for kinds llava, sdxl_turbo"),
        (minimal(kind="llava", demo=True, saes=[]), "a demo model brings its own files"),
        (minimal(kind="llava", demo=True, path=None), "a demo model brings its own files"),
    ],
)
def test_invalid_configs_name_the_field(data, expected):
    assert expected in error_of(data)


def test_demo_models_need_no_files_and_round_trip():
    data = {"models": [{"name": "demo-llava", "kind": "llava", "demo": True, "limits": {"max_new_tokens": 9}}]}
    config = parse_config(data)
    (model,) = config.models
    spec = model.to_spec(Path("/base"))
    assert model.demo and spec.path == "" and spec.saes == () and spec.limits.max_new_tokens == 9
    rendered = render_serve_config(config, base_dir="/app")
    assert parse_config(rendered["applications"][0]["args"]["config"]) == config


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_deployment_options_from_resources_replicas_and_autoscaling():
    fixed = parse_config(minimal(resources={"num_cpus": 0.5, "num_gpus": 0}, num_replicas=2, max_ongoing_requests=40)).models[0]
    assert fixed.deployment_options() == {
        "name": "model-lm",
        "max_ongoing_requests": 40,
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0},
        "num_replicas": 2,
    }
    scaled = parse_config(minimal(autoscaling={"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2})).models[0]
    options = scaled.deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2.0}


def test_colocated_models_build_one_ingress_that_reserves_their_resources():
    from services.app import build_application

    two = [{"name": n, "kind": "causal_lm", "path": "models/lm", "saes": [{"name": "res", "path": "saes/res"}],
            "resources": {"num_cpus": c, "num_gpus": g, "torch_threads": 1}} for n, c, g in (("a", 0.5, 0), ("b", 0.25, 1))]
    config = parse_config({"ingress": {"num_cpus": 0.1, "colocate_models": True}, "models": two})
    ingress = build_application(config, "/srv")._bound_deployment
    handles, _auth, _http, colocated = ingress.init_args
    assert handles == {} and list(colocated) == ["a", "b"]
    assert colocated["a"][0].name == "a" and colocated["a"][0].path == "/srv/models/lm"
    assert ingress.ray_actor_options["num_cpus"] == pytest.approx(0.85) and ingress.ray_actor_options["num_gpus"] == 1
    separate = build_application(parse_config({"ingress": {"num_cpus": 0.1}, "models": two}), "/srv")._bound_deployment
    assert list(separate.init_args[0]) == ["a", "b"] and separate.init_args[3] is None
    assert separate.ray_actor_options == {"num_cpus": 0.1}


@pytest.mark.parametrize("override,named", [
    ({"num_replicas": 2}, "models.0.num_replicas"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2}}, "models.0.autoscaling"),
    ({"resources": {"torch_threads": 2}}, "torch_threads"),
])
def test_colocated_models_cannot_scale_alone_or_differ_in_threads(override, named):
    data = minimal(**override)
    data["models"].append({**minimal()["models"][0], "name": "lm2", "resources": {"torch_threads": 1}})
    data["ingress"] = {"colocate_models": True}
    message = error_of(data)
    assert "ingress.colocate_models" in message and named in message
    data["ingress"] = {"colocate_models": False}
    assert parse_config(data).models[0].name == "lm"  # fine with a deployment per model


def test_rendered_serve_config_passes_serves_schema_and_round_trips_the_config():
    config = parse_config({**minimal(engine={"max_running_rows": 4}), "grpc": {"port": 9100, "request_timeout_s": 30}})
    rendered = render_serve_config(config, base_dir="/srv/configs")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(rendered)))  # survives YAML, as in serveConfigV2
    assert schema.grpc_options.port == 9100
    assert schema.grpc_options.request_timeout_s == 30
    assert list(schema.grpc_options.grpc_servicer_functions) == list(GRPC_SERVICER_FUNCTIONS)
    (app,) = schema.applications
    assert app.import_path == APP_IMPORT_PATH and app.name == "steering"
    assert app.args["base_dir"] == "/srv/configs"
    assert parse_config(app.args["config"]) == config


def test_servicer_functions_and_app_builder_are_importable():
    from ray._common.utils import import_attr

    for path in GRPC_SERVICER_FUNCTIONS:
        assert callable(import_attr(path))
    module, _, name = APP_IMPORT_PATH.partition(":")
    assert callable(import_attr(f"{module}.{name}"))
