"""Build the Serve application from a config, and run it locally: ``python -m services.app``.

- :func:`build_app` is the application builder named in Serve config files
  (``import_path: services.app:build_app``, ``args: {config: ..., base_dir: ...}``), so the same
  config drives ``serve deploy`` and a KubeRay RayService.
- :func:`build_application` turns a validated config into the app: the ``SteeringIngress`` that
  routes requests by model, and one ``ModelServer`` deployment per model, or with
  ``ingress.colocate_models`` the models served inside the ingress' replicas (one Serve hop per
  request instead of two; :mod:`services.local_models`).
- :func:`start` / :func:`main` start Ray and Serve with the gRPC proxy (localhost:9000 by default)
  and the HTTP proxy (localhost:8000: OpenAI-compatible API, JSON mirror, playground at ``/``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import gRPCOptions

from services.config import DEFAULT_CONFIG, GRPC_SERVICER_FUNCTIONS, ConfigError, ServiceConfig, load_config, parse_config
from services.ingress import SteeringIngress
from services.model_deployment import ModelServer


def build_application(config: ServiceConfig, base_dir: str | os.PathLike[str]) -> Application:
    """The Serve application for ``config``; relative paths resolve against ``base_dir``."""
    base = Path(base_dir)
    # ModelServer's arguments per model: bound to its deployment, or built inside the ingress
    args = {m.name: (m.to_spec(base), m.resources.torch_threads, m.demo) for m in config.models}
    colocated = config.ingress.colocate_models
    models = {} if colocated else {m.name: ModelServer.options(**m.deployment_options()).bind(*args[m.name]) for m in config.models}
    resources = {"num_cpus": config.ingress.num_cpus}
    if colocated:  # the ingress replica holds the models: it reserves what their deployments would
        resources = {"num_cpus": resources["num_cpus"] + sum(m.resources.num_cpus for m in config.models),
                     "num_gpus": sum(m.resources.num_gpus for m in config.models)}
    ingress = SteeringIngress.options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options=resources,
    )
    return ingress.bind(models, config.auth.model_dump(), {"max_body_bytes": config.http.max_body_bytes}, args if colocated else None)


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder. ``args["config"]``: a config file path or the config mapping;
    ``args["base_dir"]``: where relative paths resolve (default: the config file's directory, or
    the working directory for a mapping)."""
    source = args.get("config", str(DEFAULT_CONFIG))
    if isinstance(source, dict):
        config = parse_config(source, source="args.config")
        base_dir = args.get("base_dir") or os.getcwd()
    else:
        config = load_config(source)
        base_dir = args.get("base_dir") or Path(source).resolve().parent
    return build_application(config, base_dir)


def grpc_options(config: ServiceConfig) -> gRPCOptions:
    return gRPCOptions(
        port=config.grpc.port,
        grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
        request_timeout_s=config.grpc.request_timeout_s,
    )


def ray_env(config: ServiceConfig) -> dict[str, str]:
    """Environment for the service's Ray processes (Ray reads both when a process starts):

    - RAY_SERVE_USE_GRPC_BY_DEFAULT=1: proxy -> ingress -> model calls use Ray Serve's gRPC data
      plane instead of Ray actor calls; on 2 cores about 25% more throughput at concurrency 16
      and 3 ms less per request (see the README's performance table);
    - RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0: a
      replica runs our handlers, and the ingress its model-handle router, on the replica's own event
      loop rather than on extra threads (two of the settings of Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED``).
      Our handlers never block that loop: the engine steps on its own thread, sync methods run in
      Ray's thread pool. On 2 cores a one-token request is about 3 ms faster and the bare
      ListModels round trip about 1.5 ms (README performance table);
    - RAY_SERVE_GRPC_MAX_MESSAGE_SIZE: the proxy's message cap (Ray's default is 2 GiB).
    """
    return {
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(config.grpc.max_message_bytes),
    }


def export_ray_env(config: ServiceConfig) -> None:
    """Put :func:`ray_env` into this process' environment (values already set win), so a Ray
    cluster started from here (``ray.init``) passes it to every process."""
    for key, value in ray_env(config).items():
        os.environ.setdefault(key, value)


def controller_options(config: ServiceConfig) -> dict[str, Any]:
    """The Serve controller's env, inherited by the proxies it starts (for a cluster that was
    started elsewhere without :func:`ray_env`)."""
    return {"runtime_env": {"env_vars": ray_env(config)}}


def start(
    config_path: str | os.PathLike[str], *, ray_init_kwargs: dict[str, Any] | None = None, http_port: int | None = None
) -> ServiceConfig:
    """Start Ray (if needed), Serve with the gRPC and HTTP proxies, and the application; wait until
    it runs. HTTP listens on ``config.http`` (127.0.0.1:8000 by default; ``http_port`` overrides)."""
    import ray

    config = load_config(config_path)
    check_local_paths(config, Path(config_path).resolve().parent)
    if not ray.is_initialized():
        export_ray_env(config)
        ray.init(**(ray_init_kwargs or {}))
    serve.start(
        grpc_options=grpc_options(config),
        http_options={"host": config.http.host, "port": http_port or config.http.port},
        controller_options=controller_options(config),
    )
    app = build_application(config, Path(config_path).resolve().parent)
    serve.run(app, name=config.app_name, route_prefix="/", blocking=False)
    return config


def check_local_paths(config: ServiceConfig, base_dir: Path) -> None:
    """Fail fast, before starting Ray, when a local model, SAE, probe or steering-vector path does not exist."""
    missing = []
    for n, m in enumerate(config.models):
        spec = m.to_spec(base_dir)
        named = [(f"models.{n}.path", m.path, spec.path)] if not m.demo else []
        named += [(f"models.{n}.saes.{k}.path", s.path, t.path) for k, (s, t) in enumerate(zip(m.saes, spec.saes))]
        named += [(f"models.{n}.risk_probe", m.risk_probe, spec.risk_probe)]
        named += [(f"models.{n}.vectors.{name}.path", v.path, t.path) for (name, v), t in zip(m.vectors.items(), spec.vectors)]
        missing += [f"  {field}: {resolved} does not exist" for field, given, resolved in named if given and not Path(resolved).exists()]
    if missing:
        hint = "\n(the demo models are built by `make demo-models`)" if any("/models/" in line for line in missing) else ""
        raise ConfigError("config names files that are not there:\n" + "\n".join(missing) + hint)


def example_call(config: ServiceConfig) -> str:
    cli = f"python -m services.cli --target localhost:{config.grpc.port}"
    lines = [f"  {cli} list-models"]
    for m in config.models:
        if m.kind == "sdxl_turbo":
            lines.append(f'  {cli} image --model {m.name} --steps 1 --out image.png "a cat"')
        elif m.kind == "causal_lm":
            lines.append(f'  {cli} generate --model {m.name} --set color:red=60 "the"')
        elif m.kind == "llava":
            lines.append(f'  {cli} generate --model {m.name} --image some.png "what colour is it"')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the SAE steering API (gRPC and HTTP) locally (Ctrl-C stops it).")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint (default: %(default)s)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user cluster

    import ray

    try:
        check_local_paths(load_config(args.config), Path(args.config).resolve().parent)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        config = start(args.config, ray_init_kwargs={"_metrics_export_port": args.metrics_port})
        print(f"\nSAE steering service: gRPC on localhost:{config.grpc.port}, HTTP on http://{config.http.host}:{config.http.port} "
              f"(playground at /, OpenAI-compatible /v1), models: {', '.join(m.name for m in config.models)}\n"
              f"Metrics: http://localhost:{args.metrics_port}/metrics\nTry:\n{example_call(config)}\n(Ctrl-C to stop)",
              flush=True)
        stop.wait()
    finally:
        print("shutting down...", file=sys.stderr, flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
