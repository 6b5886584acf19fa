"""Names, tiny artifact builders and the session's service config, shared by the service-level tests
(services, reliability, deploy)."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

import torch

LM = "lm"
IMAGE = "img"
LM_SAE = "res"
IMG_SAE = "mid"
LM_HOOK = "blocks.0.hook_resid_post"
IMG_HOOK = "unet.mid_block.attentions.0"
#: Labels written into the LM's SAE file (label -> latent index).
LM_LABELS = {"color:red": 3, "color:blue": 5, "animal:cat": 9, "animal:dog": 17, "mood:happy": 40}
IMG_LABELS = {"texture:fur": 7, "color:red": 11}
#: The same LM served a second time with three other dictionaries: a G-SAE (top-k-sigmoid, its first
#: latents the labelled concepts), a SpaDE and the MLP's own neurons (FF-KV, built from the model).
DICTS = "lm-dicts"
GSAE, SPADE, FFKV = "gs", "sp", "kv"
GSAE_LABELS = {"color:red": 0, "color:blue": 1}
FFKV_LAYER, FFKV_K = 1, 8
VLM = "vlm"
VLM_SAE = "vis"
VLM_HOOK = "vision.layers.1"  # hidden_states[-2] of the tiny 3-layer CLIP tower: what the projector reads
VLM_LABELS = {"shape:round": 2, "color:green": 6}
#: Every model the session serves, in config order.
SERVED_MODELS = ("lm", "lm-dicts", "vlm", "img")
LM_LIMITS = {"max_new_tokens": 24, "max_prompt_tokens": 64, "max_edits": 16, "max_batch_size": 16,
             "max_inline_vector_dims": 64, "max_variants": 4, "max_vector_prompts": 8}
#: The LM's declared steering vector (a seeded random direction, file written by build_artifacts).
LM_VECTOR = "shift"
LM_VECTOR_KEY = "direction"
#: The LM's presets, written as request plans in proto JSON (configs: ``presets:``).
LM_PRESETS = {
    "red": {"edits": [{"sae": LM_SAE, "op": "EDIT_OP_SET", "labels": ["color:red"], "value": 8.0}]},
    "shifted": {"vectors": [{"vector": LM_VECTOR, "op": "EDIT_OP_ADD", "value": 2.0}]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




#: The session service's HTTP body cap (small, so the 413 test sends little).
HTTP_MAX_BODY_BYTES = 1 << 20


@contextmanager
def second_application(service, config: dict, timeout_s: float = 120):
    """Serve ``config`` (its ``app_name``, a parsed service config) as another application on the
    session's Serve, on route ``/<app_name>``; yields the gRPC metadata that routes a call to it
    once its health check says SERVING, and deletes the application after."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve

    from services.app import build_application
    from services.config import parse_config

    name = config["app_name"]
    serve.run(build_application(parse_config(config), service.artifacts), name=name, route_prefix=f"/{name}", blocking=False)
    metadata = (("application", name),)
    try:
        with grpc.insecure_channel(service.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.time() + timeout_s
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.time() < deadline, f"the application {name!r} did not come up"
                time.sleep(0.5)
        yield metadata
    finally:
        serve.delete(name, _blocking=True)


def service_config(grpc_port: int, http_port: int = 8000) -> dict:
    small = {"num_cpus": 0.1, "torch_threads": 1}
    return {
        "grpc": {"port": grpc_port, "request_timeout_s": 120},
        "http": {"port": http_port, "max_body_bytes": HTTP_MAX_BODY_BYTES},
        "ingress": {"num_cpus": 0.1},
        "models": [
            {
                "name": LM,
                "kind": "causal_lm",
                "description": "tiny random llama",
                "path": "lm",
                "saes": [{"name": LM_SAE, "path": f"saes/{LM_SAE}", "format": "native"}],
                "risk_probe": "risk",
                "limits": LM_LIMITS,
                "vectors": {LM_VECTOR: {"path": f"vectors/{LM_VECTOR}.safetensors", "hook_name": LM_HOOK, "tensor_key": LM_VECTOR_KEY}},
                "presets": LM_PRESETS,
                "engine": {"max_running_rows": 16},
                "resources": small,
                "max_ongoing_requests": 64,
            },
            {
                "name": DICTS,
                "kind": "causal_lm",
                "description": "the tiny llama with a G-SAE, a SpaDE and its own MLP neurons",
                "path": "lm",
                "saes": [
                    {"name": GSAE, "path": f"saes/{GSAE}"},
                    {"name": SPADE, "path": f"saes/{SPADE}"},
                    {"name": FFKV, "ffkv": {"layer": FFKV_LAYER, "k": FFKV_K}},
                ],
                "limits": LM_LIMITS,
                "engine": {"max_running_rows": 4},
                "resources": small,
            },
            {
                "name": VLM,
                "kind": "llava",
                "path": "llava",
                "saes": [{"name": VLM_SAE, "path": f"saes/{VLM_SAE}"}],
                "limits": {"max_new_tokens": 16, "max_batch_size": 8, "max_image_bytes": 10_000, "max_image_side": 64},
                "engine": {"max_running_rows": 8},
                "resources": small,
            },
            {
                "name": IMAGE,
                "kind": "sdxl_turbo",
                "path": "sdxl",
                "saes": [{"name": IMG_SAE, "path": f"saes/{IMG_SAE}"}],
                "limits": {"max_inference_steps": 2, "max_image_side": 64, "max_batch_size": 4},
                "engine": {"max_running_rows": 4},
                "resources": small,
            },
        ],
    }


@contextmanager
def one_thread():
    """Run in-process reference computations with 1 torch thread, as the replicas do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)




def png_bytes(seed: int, size: int = 20) -> bytes:
    """A random RGB PNG."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def save_vector(path: Path, direction: torch.Tensor) -> None:
    """A steering-vector file as the config declares them: safetensors, one 1-D tensor."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({LM_VECTOR_KEY: direction.float().contiguous()}, str(path))


def build_artifacts(root: Path) -> Path:
    """Under ``root``: a tiny Llama LM (+ SAE, risk probe, G-SAE, SpaDE), a tiny LLaVA (+ vision SAE) and a tiny
    SDXL-Turbo (+ U-Net SAE), saved as users ship them."""
    from sae_runtime.demo.tiny_models import build_tiny_causal_lm, build_tiny_llava
    from sae_runtime.demo.tiny_sdxl import save_tiny_sdxl
    from sae_runtime.demo.tiny_saes import random_probe, random_sae
    from sae_runtime.formats import save_native

    build_tiny_causal_lm(root / "lm", "llama", seed=0, hidden_size=32, num_layers=2, init_std=0.1)
    save_native(random_sae(32, 64, LM_HOOK, labels=LM_LABELS, seed=1), root / "saes" / LM_SAE)
    save_vector(root / "vectors" / f"{LM_VECTOR}.safetensors", torch.randn(32, generator=torch.Generator().manual_seed(5)))
    random_probe(LM_SAE, 64, labels=LM_LABELS, seed=2).save(root / "risk")
    save_native(random_sae(32, 64, LM_HOOK, labels=GSAE_LABELS, seed=6, architecture="topk-sigmoid", k=4, n_concepts=2), root / "saes" / GSAE)
    save_native(random_sae(32, 48, LM_HOOK, seed=7, architecture="spade"), root / "saes" / SPADE)
    build_tiny_llava(root / "llava", seed=0)
    save_native(random_sae(32, 64, VLM_HOOK, labels=VLM_LABELS, seed=4), root / "saes" / VLM_SAE)
    save_tiny_sdxl(root / "sdxl", seed=0)
    save_native(random_sae(64, 128, IMG_HOOK, labels=IMG_LABELS, seed=3), root / "saes" / IMG_SAE)
    return root
