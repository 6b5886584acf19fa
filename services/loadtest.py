"""Load-test a running steering service over gRPC: ``python -m services.loadtest``.

    python -m services.loadtest --target 127.0.0.1:9000 --concurrency 16 --requests 200 \\
        --mix steered=4,unsteered=2,stream=2,image=1 --deadline 30 --report reports/loadtest.json

``--concurrency`` workers (asyncio tasks on one grpc.aio channel) each send one request at a
time until ``--requests`` have been sent or ``--duration`` seconds have passed, whichever comes
first; every request carries a gRPC deadline (``--deadline``). The request kinds, drawn with the
``--mix`` weights from a seeded generator:

- ``steered``: Generate with its own random edit set (1 to ``--max-edits`` edits: random op,
  SAE, latents, value), so concurrent requests batch with different plans;
- ``unsteered``: Generate with no edits;
- ``stream``: GenerateStream with a random edit set (time to first token is reported too);
- ``image``: GenerateImage with a random edit set on an image model's U-Net SAEs;
- ``multimodal``: GenerateMultimodal with a small PNG on a LLaVA model;
- ``encode``: Encode of a prompt.

Models and SAEs come from ListModels (restrict them with ``--model``); kinds no served model can
take are dropped from the default mix (asking for one explicitly is an error). Prints throughput,
p50/p95/p99 latency overall and per kind, errors by status code, and writes a JSON report.

Bounded: at most 100,000 requests and one hour; with no ``--duration`` the run stops issuing
after ``--max-time`` (600 s) anyway, and in-flight requests end by their deadline. Targets must
be loopback addresses (127.0.0.0/8, ::1, localhost) unless ``--allow-remote`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import grpc
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services.client import MAX_MESSAGE_BYTES, Generation, SteeringClient, edit
from services.loadtest_stats import Sample, format_summary, percentile, summarize  # noqa: F401 - percentile re-exported

KINDS = ("steered", "unsteered", "stream", "image", "multimodal", "encode")
#: Which model kinds serve each request kind.
SERVED_BY = {
    "steered": ("causal_lm", "llava"),
    "unsteered": ("causal_lm", "llava"),
    "stream": ("causal_lm", "llava"),
    "encode": ("causal_lm", "llava"),
    "multimodal": ("llava",),
    "image": ("sdxl_turbo",),
}
DEFAULT_MIX = "steered=4,unsteered=2,stream=2,image=1,multimodal=1"
OPS = ("set", "scale", "ablate", "add", "cap")
PROMPTS = ("the", "a red cat", "the dog is", "once upon a time", "my favourite colour is", "tell me about the sea")
MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 1024


class UsageError(ValueError):
    """A bad command line or a target/mix the tool refuses; the message says why."""


# -- target policy ------------------------------------------------------------------------------------
def split_target(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
    else:
        host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"target must be host:port, got {target!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8 or ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_target(target: str, allow_remote: bool) -> None:
    host, _ = split_target(target)
    if not allow_remote and not is_loopback(host):
        raise UsageError(
            f"refusing non-loopback target {target!r}: load tests go to 127.0.0.1/::1/localhost by default; "
            "pass --allow-remote to load a service you run elsewhere"
        )


# -- the request mix ------------------------------------------------------------------------------------
def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        if kind not in KINDS:
            raise UsageError(f"--mix: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise UsageError(f"--mix: weight of {kind!r} must be a number, got {weight!r}") from None
        if not value >= 0 or math.isinf(value):
            raise UsageError(f"--mix: weight of {kind!r} must be >= 0")
        mix[kind] = value
    if not any(mix.values()):
        raise UsageError("--mix: give at least one kind a positive weight")
    return mix


def steerable_saes(model: pb.ModelInfo, kind: str) -> list[pb.SaeInfo]:
    """The SAEs a request of ``kind`` may edit: vision-encoder SAEs only when there is an image."""
    return [s for s in model.saes if kind == "multimodal" or not s.hook_name.startswith("vision.")]


def eligible_models(models: Sequence[pb.ModelInfo], kind: str) -> list[pb.ModelInfo]:
    """Models that take ``kind`` (and, for the edited kinds, have an SAE to edit)."""
    needs_sae = kind not in ("unsteered", "encode")
    return [m for m in models if m.kind in SERVED_BY[kind] and (not needs_sae or steerable_saes(m, kind))]


def tiny_png(rng: random.Random, side: int = 32) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class RequestFactory:
    """Builds the run's requests, one per :meth:`build` call, from the served models (ListModels) and a seeded RNG."""

    models: Sequence[pb.ModelInfo]
    mix: dict[str, float]
    seed: int = 0
    max_new_tokens: int = 16
    max_edits: int = 4
    image_size: int = 0
    image_steps: int = 1
    prompts: Sequence[str] = PROMPTS
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._kinds = [k for k, w in self.mix.items() if w > 0]
        self._weights = [self.mix[k] for k in self._kinds]
        self._png = tiny_png(random.Random(self.seed))

    def _edits(self, model: pb.ModelInfo, kind: str) -> list[pb.LatentEdit]:
        saes = steerable_saes(model, kind)
        edits = []
        for _ in range(self.rng.randint(1, max(1, self.max_edits))):
            sae = self.rng.choice(saes)
            op = self.rng.choice(OPS)
            latents = self.rng.sample(range(sae.width), k=min(sae.width, self.rng.randint(1, 3)))
            value = {"set": self.rng.uniform(0, 8), "scale": self.rng.uniform(0, 3), "ablate": 0.0,
                     "add": self.rng.uniform(-4, 4), "cap": self.rng.uniform(0, 2)}[op]
            edits.append(edit(sae.name, op, *latents, value=round(value, 3)))
        return edits

    def build(self) -> tuple[str, str, Any]:
        """(kind, model name, request message)."""
        kind = self.rng.choices(self._kinds, weights=self._weights)[0]
        model = self.rng.choice(eligible_models(self.models, kind))
        prompt = self.rng.choice(self.prompts)
        seed = self.rng.randrange(2**31)
        generation = Generation(max_new_tokens=self.max_new_tokens)
        if kind == "image":
            request = pb.GenerateImageRequest(model=model.name, prompt=prompt, seed=seed, num_inference_steps=self.image_steps,
                                              height=self.image_size, width=self.image_size)
            request.plan.edits.extend(self._edits(model, kind))
        elif kind == "encode":
            request = pb.EncodeRequest(model=model.name, text=prompt, top_k=5)
        else:
            edits = [] if kind == "unsteered" else self._edits(model, kind)
            image = self._png if kind == "multimodal" else None
            request = SteeringClient.text_request(model.name, prompt, edits=edits, generation=generation, seed=seed, image=image)
        return kind, model.name, request


def plan_mix(models: Sequence[pb.ModelInfo], mix_text: str | None) -> tuple[dict[str, float], list[str]]:
    """The mix to run and the kinds dropped from the default mix for want of a model."""
    mix = parse_mix(mix_text or DEFAULT_MIX)
    missing = [k for k, w in mix.items() if w > 0 and not eligible_models(models, k)]
    if missing and mix_text:
        raise UsageError(f"--mix asks for {', '.join(missing)}, which no served model takes "
                         f"(models: {', '.join(f'{m.name} ({m.kind})' for m in models) or 'none'})")
    for kind in missing:
        mix[kind] = 0.0
    if not any(mix.values()):
        raise UsageError("no served model takes any request kind of the mix")
    return mix, missing


# -- running --------------------------------------------------------------------------------------------
async def send(stub: steering_pb2_grpc.SteeringStub, kind: str, model: str, request: Any,
               deadline_s: float, metadata: tuple) -> Sample:
    started = time.perf_counter()
    ttft, tokens, batch = None, 0, 0
    try:
        if kind == "stream":
            async for message in stub.GenerateStream(request, timeout=deadline_s, metadata=metadata):
                if ttft is None:
                    ttft = time.perf_counter() - started
                if message.HasField("token"):
                    tokens += 1
                if message.HasField("final"):
                    batch = message.final.timings.batch_size
        else:
            rpc = {"image": stub.GenerateImage, "multimodal": stub.GenerateMultimodal, "encode": stub.Encode}.get(kind, stub.Generate)
            response = await rpc(request, timeout=deadline_s, metadata=metadata)
            batch = response.timings.batch_size
            if kind != "image" and kind != "encode":
                tokens = len(response.completion.tokens)
        status = "OK"
    except grpc.aio.AioRpcError as err:
        status = err.code().name
    except Exception as err:  # noqa: BLE001 - a client-side failure is a result too
        status = f"CLIENT_{type(err).__name__}"
    return Sample(kind, model, status, time.perf_counter() - started, ttft, tokens, batch)


async def run_load(target: str, factory: RequestFactory, *, concurrency: int, requests: int, duration_s: float,
                   deadline_s: float, token: str | None = None) -> tuple[list[Sample], float]:
    """Send up to ``requests`` requests with ``concurrency`` workers for at most ``duration_s``
    seconds (in-flight requests end by their deadline). Returns the samples and the wall time."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    samples: list[Sample] = []
    issued = 0
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = steering_pb2_grpc.SteeringStub(channel)
        started = time.perf_counter()
        stop_at = started + duration_s

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < stop_at:
                issued += 1
                kind, model, request = factory.build()
                samples.append(await send(stub, kind, model, request, deadline_s, metadata))

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        done, pending = await asyncio.wait(workers, timeout=duration_s + deadline_s + 5)
        for task in pending:  # a hard stop; deadlines should have ended them already
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        wall = time.perf_counter() - started
    return samples, wall


async def list_models(target: str, token: str | None, timeout_s: float = 30.0) -> list[pb.ModelInfo]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(target) as channel:
        response = await steering_pb2_grpc.SteeringStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=timeout_s, metadata=metadata
        )
    return list(response.models)


# -- command line -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:9000", help="host:port of the gRPC API (default: %(default)s)")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--requests", type=int, default=None, help=f"requests to send (default 100 without --duration; max {MAX_REQUESTS})")
    p.add_argument("--duration", type=float, default=None, help=f"seconds to keep sending (max {MAX_DURATION_S:.0f})")
    p.add_argument("--max-time", type=float, default=600.0, help="stop issuing after this many seconds when no --duration")
    p.add_argument("--mix", default=None, help=f"kind=weight,... over {', '.join(KINDS)} (default: {DEFAULT_MIX})")
    p.add_argument("--model", action="append", default=[], help="only these served models (repeatable)")
    p.add_argument("--deadline", type=float, default=60.0, help="gRPC deadline per request, seconds (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-edits", type=int, default=4, help="edits per steered request: 1 to this many")
    p.add_argument("--image-size", type=int, default=0, help="image side for GenerateImage (0 = model default)")
    p.add_argument("--image-steps", type=int, default=1)
    p.add_argument("--prompt", action="append", default=[], help="prompts to draw from (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--token", default=os.environ.get("STEERING_TOKEN"), help="bearer token (default: $STEERING_TOKEN)")
    p.add_argument("--report", default="reports/loadtest.json", help="JSON report path (default: %(default)s)")
    return p


def check_bounds(args: argparse.Namespace) -> tuple[int, float]:
    """(request count, seconds) the run is bounded by."""
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise UsageError(f"--concurrency must be in [1, {MAX_CONCURRENCY}]")
    if args.requests is not None and not 1 <= args.requests <= MAX_REQUESTS:
        raise UsageError(f"--requests must be in [1, {MAX_REQUESTS}]")
    for name in ("duration", "max_time"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= MAX_DURATION_S:
            raise UsageError(f"--{name.replace('_', '-')} must be in (0, {MAX_DURATION_S:.0f}] seconds")
    if not 0 < args.deadline <= MAX_DURATION_S:
        raise UsageError("--deadline must be positive (seconds)")
    if args.max_new_tokens < 1 or args.max_edits < 1 or args.image_steps < 1 or args.image_size < 0:
        raise UsageError("--max-new-tokens, --max-edits and --image-steps must be >= 1, --image-size >= 0")
    requests = args.requests if args.requests is not None else (MAX_REQUESTS if args.duration else 100)
    return requests, args.duration if args.duration is not None else args.max_time


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    requests, seconds = check_bounds(args)
    check_target(args.target, args.allow_remote)
    mix_text = args.mix
    parse_mix(mix_text or DEFAULT_MIX)  # a bad --mix fails before any connection
    models = await list_models(args.target, args.token)
    if args.model:
        unknown = sorted(set(args.model) - {m.name for m in models})
        if unknown:
            raise UsageError(f"--model: not served: {', '.join(unknown)} (served: {', '.join(m.name for m in models)})")
        models = [m for m in models if m.name in args.model]
    mix, dropped = plan_mix(models, mix_text)
    factory = RequestFactory(models, mix, seed=args.seed, max_new_tokens=args.max_new_tokens, max_edits=args.max_edits,
                             image_size=args.image_size, image_steps=args.image_steps, prompts=args.prompt or PROMPTS)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    samples, wall = await run_load(args.target, factory, concurrency=args.concurrency, requests=requests,
                                   duration_s=seconds, deadline_s=args.deadline, token=args.token)
    settings = {k: v for k, v in vars(args).items() if k != "token"}
    return {
        "tool": "services.loadtest",
        "started_at": started_at,
        "target": args.target,
        "settings": {**settings, "requests_bound": requests, "seconds_bound": seconds, "mix": mix, "dropped_kinds": dropped},
        "models": [{"name": m.name, "kind": m.kind, "saes": [s.name for s in m.saes]} for m in models],
        **summarize(samples, wall),
        "samples": [asdict(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(_main(args))
    except UsageError as err:
        parser.error(str(err))  # exits 2
    except grpc.aio.AioRpcError as err:
        print(f"cannot list the service's models at {args.target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(format_summary(report))
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
