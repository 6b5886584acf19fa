"""What the serving benchmarks share: the demo LM (or a stand-in of its size), a Serve app of
their own on free loopback ports, requests with a distinct edit set each, and timing helpers.

The demo LM is ``demo-lm`` of configs/demo.yaml when its files exist (``make demo-models``).
Until then a stand-in of the same shape is written to a temp dir: a random Llama (hidden 128,
MLP 512, 4 layers, 4 heads, vocabulary 512) with a random 1024-latent SAE on
``blocks.2.hook_resid_post``; the benchmark prints which one it measured.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEMO_MODEL = "demo-lm"
STANDIN_SITE = "blocks.2.hook_resid_post"
PROMPTS = ("the", "a red fox", "the dog is", "the cat lives in the", "the owl feels", "the blue bird sees a")  # concept-world words


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LmSetup:
    """A service config (YAML dict) serving one causal LM named ``model``, and where it resolves."""

    config: dict
    base_dir: Path
    model: str
    what: str  # printed: which model this is


def _demo_model_entry() -> dict | None:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    entry = next((m for m in data["models"] if m["name"] == DEMO_MODEL), None)
    if entry is None or "path" not in entry:
        return None
    if not (DEMO_CONFIG.parent / entry["path"]).exists():
        return None
    return entry


def _standin(root: Path) -> dict:
    from sae_runtime.demo.tiny_models import build_tiny_causal_lm
    from sae_runtime.demo.tiny_saes import random_sae
    from sae_runtime.formats import save_native

    build_tiny_causal_lm(root / "lm", "llama", seed=0, vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                         intermediate_size=512, init_std=0.05)
    save_native(random_sae(128, 1024, STANDIN_SITE, seed=1), root / "saes" / "concepts")
    return {"name": DEMO_MODEL, "kind": "causal_lm", "path": "lm", "saes": [{"name": "concepts", "path": "saes/concepts"}],
            "limits": {"max_prompt_tokens": 256, "max_new_tokens": 64, "max_edits": 256, "max_batch_size": 16}}


@contextmanager
def demo_lm_setup(*, separate_deployments: bool = False, **model_overrides) -> Iterator[LmSetup]:
    """The demo LM's service config (ingress, engine, limits and resources as configs/demo.yaml
    sets them), with ``model_overrides`` applied to its model entry; ``separate_deployments``
    serves the model in a deployment of its own even where configs/demo.yaml colocates it."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    demo_entry = next(m for m in demo["models"] if m["name"] == DEMO_MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        entry = _demo_model_entry()
        if entry is not None:
            base_dir, what = DEMO_CONFIG.parent, "demo-lm from configs/demo.yaml"
        else:
            base_dir, what = Path(tmp), "stand-in for demo-lm (models/demo-lm not built): random Llama d128 x4 layers, SAE 1024"
            entry = _standin(base_dir)
        for key in ("engine", "resources", "max_ongoing_requests", "dtype", "device"):
            if key in demo_entry:
                entry[key] = demo_entry[key]
        entry.update(model_overrides)
        ingress = dict(demo.get("ingress", {}))
        if separate_deployments:
            ingress["colocate_models"] = False
        config = {"grpc": {"port": free_port(), "request_timeout_s": 120}, "ingress": ingress, "models": [entry]}
        yield LmSetup(config, base_dir, DEMO_MODEL, what)


def add_topology_flag(parser) -> None:
    """``--separate-deployments``: the model in a deployment of its own (two Serve hops), not
    colocated in the ingress as configs/demo.yaml has it."""
    parser.add_argument("--separate-deployments", action="store_true",
                        help="serve the model in its own deployment (configs/demo.yaml colocates it in the ingress)")


def topology(setup: LmSetup) -> str:
    colocated = setup.config["ingress"].get("colocate_models", False)
    return "model colocated in the ingress (one Serve hop)" if colocated else "model in its own deployment (two Serve hops)"


@contextmanager
def serving(setup: LmSetup, *extra_models: dict) -> Iterator[str]:
    """Ray (a local cluster of its own) + Serve with the gRPC proxy serving ``setup`` (and
    ``extra_models`` entries); yields the gRPC target, and shuts everything down after."""
    import ray
    from ray import serve

    from services.app import build_application, controller_options, export_ray_env, grpc_options
    from services.config import parse_config
    from services.healthcheck import check

    config = parse_config({**setup.config, "models": [*setup.config["models"], *extra_models]})
    export_ray_env(config)  # the service's Ray settings (inter-deployment gRPC), as `make serve` runs it
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(grpc_options=grpc_options(config), http_options={"host": "127.0.0.1", "port": free_port()},
                    controller_options=controller_options(config))
        serve.run(build_application(config, setup.base_dir), name=config.app_name, route_prefix="/", blocking=False)
        target = f"127.0.0.1:{config.grpc.port}"
        deadline = time.monotonic() + 300
        while not check(target, timeout=2.0)[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("service not SERVING after 300 s")
            time.sleep(0.5)
        yield target
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def distinct_edit_sets(n: int, sae: str, width: int, *, seed: int = 0, latents_per_edit: int = 8) -> list[list[tuple]]:
    """``n`` different edit sets, each (op, latents, value) clamps/scales on random latents."""
    rng = random.Random(seed)
    sets = []
    for _ in range(n):
        edits = [("set", tuple(rng.sample(range(width), latents_per_edit)), round(rng.uniform(2.0, 8.0), 3))]
        if rng.random() < 0.5:
            edits.append(("scale", tuple(rng.sample(range(width), 4)), round(rng.uniform(0.0, 2.0), 3)))
        sets.append([(sae, *e) for e in edits])
    return sets


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} torch threads here"


def steered_requests(client, model: str, n: int, new_tokens) -> list:
    """``n`` GenerateRequests for ``model``, each with its own edit set (8 latents clamped, some
    scaled) on the model's first SAE, prompt ``i % len(PROMPTS)`` and seed ``i``;
    ``new_tokens(i)`` gives request i's Generation."""
    from services.client import SteeringClient, edit

    (info,) = [m for m in client.list_models() if m.name == model]
    sae = info.saes[0]
    edit_sets = distinct_edit_sets(n, sae.name, sae.width, seed=0)
    return [
        SteeringClient.text_request(
            model, PROMPTS[i % len(PROMPTS)], seed=i,
            edits=[edit(s, op, *latents, value=value) for s, op, latents, value in edit_sets[i]],
            generation=new_tokens(i),
        )
        for i in range(n)
    ]
