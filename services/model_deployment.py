"""One Ray Serve deployment per configured model: validate each request, batch, call the backend.

Every request is converted and validated on its own (``Backend.validate``) before it joins a
batch, so a bad request fails alone with a status naming its field and never reaches the batch.
Concurrent valid requests are grouped by a :class:`ReplicaBatcher` into ONE batched backend pass
with per-row plans; a batch forms when the replica is free (see services/batching.py for why not
``@serve.batch``). Should a batched pass still fail, each request of that batch is retried alone,
so only the culprit sees the error.

GenerateStream requests join the same text batches as Generate calls (``backend.stream_many``),
their tokens relayed as the pass produces them. The backend is not re-entrant (hooks live on shared modules), so every backend
call holds one asyncio lock: batches and encodes run one at a time per replica; the event loop stays
free to accept and validate new requests (the work runs in a thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from ray import serve
from steering.v1 import steering_pb2 as pb

from sae_runtime.backends import types as rt
from sae_runtime.backends.spec import ModelSpec
from sae_runtime.errors import InvalidArgument, SaeRuntimeError
from services import convert
from services.batching import ReplicaBatcher
from services.backend_factory import build_backend, demo_spec
from services.metrics import model_metrics

DEFAULT_SEARCH_LIMIT = 20
MAX_SEARCH_LIMIT = 1000


@dataclass(frozen=True)
class _Job:
    request: Any  # a validated rt.TextRequest or rt.ImageRequest
    received_at: float  # wall clock (time.time()) when the service received the request
    tokens: asyncio.Queue | None = None  # a stream's token events (rt.StreamEvent), None for unary calls


@dataclass(frozen=True)
class _Outcome:
    value: Any  # the result, or the exception this request failed with
    started: float
    finished: float
    batch_size: int

    def result(self) -> Any:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


def run_isolated(fn: Callable[[list], Sequence], requests: list) -> list:
    """``fn(requests)``; if the batched call fails, each request alone (its result or exception)."""
    try:
        results = list(fn(requests))
        if len(results) != len(requests):
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        return results
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing row below
        if len(requests) == 1:
            return [batch_error]
    outcomes: list = []
    for request in requests:
        try:
            outcomes.append(fn([request])[0])
        except Exception as err:  # noqa: BLE001 - returned to that request's caller
            outcomes.append(err)
    return outcomes


async def in_thread(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread. If the caller is cancelled (client gone), wait for the
    thread to finish before re-raising, so the backend lock is never released under a running call."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.gather(work, return_exceptions=True)
        raise


#: Files up to this size are hashed whole by :func:`fingerprint`; larger ones by size and first MiB.
FINGERPRINT_FULL_BYTES = 16 * 1024 * 1024


def fingerprint(path: str | None) -> str:
    """A version for a local file or directory when the backend reports none: a short hash of
    file names and contents (files over 16 MiB: size and first MiB). Hub ids are their own version."""
    if not path:
        return ""
    root = Path(path)
    if not root.exists():
        return path
    digest = hashlib.sha256()
    for f in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root).as_posix() if f != root else f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(size if size <= FINGERPRINT_FULL_BYTES else 1 << 20))
    return digest.hexdigest()[:12]


#: Which RPC families a model kind serves.
TEXT_KINDS = ("causal_lm", "llava")
MULTIMODAL_KINDS = ("llava",)
IMAGE_KINDS = ("sdxl_turbo",)


@serve.deployment
class ModelServer:
    """A replica holding one loaded backend. Methods take and return proto messages."""

    def __init__(self, spec: ModelSpec, batching: dict[str, float], torch_threads: int | None = None, demo: bool = False) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.metrics = model_metrics()
        self.spec = spec = demo_spec(spec) if demo else spec  # a demo is built (first start) or found in the cache
        started = time.perf_counter()
        self.backend = build_backend(spec)
        self.metrics.load_s.observe(time.perf_counter() - started, tags={"model": spec.name})
        for sae, seconds in self.backend.load_timings.items():
            self.metrics.sae_load_s.observe(float(seconds), tags={"model": spec.name, "sae": str(sae)})
        self.info = self.backend.info()
        self.sae_names = tuple(s.name for s in self.info.saes)
        self.versions = self._versions()
        self._lock = asyncio.Lock()
        size, wait = int(batching["max_batch_size"]), float(batching["batch_wait_timeout_s"])
        self._text_batches: ReplicaBatcher[_Job, _Outcome] = ReplicaBatcher(self._run_text_batch, size, wait)
        self._image_batches: ReplicaBatcher[_Job, _Outcome] = ReplicaBatcher(
            lambda jobs: self._run_batch("generate_image", self.backend.generate_images, jobs), size, wait
        )

    # -- helpers ---------------------------------------------------------------------------------
    def _versions(self) -> pb.Versions:
        """Versions from the backend, or file fingerprints where it reports none."""
        versions = convert.versions_of(self.info, fingerprint(self.spec.risk_probe))
        if not versions.model_version:
            versions.model_version = fingerprint(self.spec.path)
        paths = {s.name: s.path for s in self.spec.saes}
        for name, version in list(versions.saes.items()):
            if not version:
                versions.saes[name] = fingerprint(paths.get(name))
        return versions

    def _require_kind(self, kinds: tuple[str, ...], rpc: str) -> None:
        if self.info.kind not in kinds:
            raise InvalidArgument(f"model {self.spec.name!r} is a {self.info.kind} model; {rpc} needs one of: {', '.join(kinds)}", field="model")

    def _validated(self, request: Any) -> Any:
        try:
            return self.backend.validate(request)
        except SaeRuntimeError as err:
            renamed = convert.proto_field(err.field)
            if renamed == err.field:
                raise
            raise type(err)(err.message, field=renamed) from None

    def _timings(self, outcome: _Outcome, received_at: float) -> pb.Timings:
        return pb.Timings(
            queue_ms=max(0.0, outcome.started - received_at) * 1e3,
            compute_ms=(outcome.finished - outcome.started) * 1e3,
            total_ms=max(0.0, time.time() - received_at) * 1e3,
            batch_size=outcome.batch_size,
        )

    def _observe(self, method: str, timings: pb.Timings) -> None:
        tags = {"model": self.spec.name, "method": method}
        self.metrics.queue_ms.observe(timings.queue_ms, tags=tags)
        self.metrics.compute_ms.observe(timings.compute_ms, tags=tags)

    def _observe_text(self, result: rt.TextResult, steered: bool) -> None:
        model = {"model": self.spec.name}
        n_tokens = len(result.steered.tokens) + (len(result.default.tokens) if result.default else 0)
        if n_tokens:
            self.metrics.tokens.inc(n_tokens, tags=model)
        self.metrics.steered.inc(tags={**model, "steered": "true" if steered else "false"})
        if result.risk_final is not None:
            self.metrics.risk.observe(result.risk_final.probability, tags=model)

    async def _run_batch(self, method: str, fn: Callable[[list], Sequence], jobs: list[_Job]) -> list[_Outcome]:
        async with self._lock:
            started = time.time()
            values = await in_thread(run_isolated, fn, [j.request for j in jobs])
            finished = time.time()
        self.metrics.batch_size.observe(len(jobs), tags={"model": self.spec.name, "method": method})
        return [_Outcome(v, started, finished, len(jobs)) for v in values]

    async def _run_text_batch(self, jobs: list[_Job]) -> list[_Outcome]:
        """Generate and GenerateStream requests share batches: one ``backend.stream_many`` pass,
        whose token events go to the streams' queues as they are produced."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            started = time.time()
            values = await in_thread(self._text_pass, jobs, loop)
            finished = time.time()
        self.metrics.batch_size.observe(len(jobs), tags={"model": self.spec.name, "method": "generate"})
        return [_Outcome(v, started, finished, len(jobs)) for v in values]

    def _text_pass(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> list:
        """(Worker thread.) Results or exceptions per job. If the batched pass fails, each job is
        retried alone, as :func:`run_isolated` does, except a stream that already got tokens: it
        gets the batch's error rather than its tokens twice."""
        streamed: set[int] = set()

        def run(indices: list[int]) -> list:
            results: dict[int, Any] = {}
            passes = self.backend.stream_many([jobs[k].request for k in indices], [jobs[k].tokens is not None for k in indices])
            for i, event in passes:
                k = indices[i]
                if event.result is not None:
                    results[k] = event.result
                else:
                    streamed.add(k)
                    loop.call_soon_threadsafe(jobs[k].tokens.put_nowait, event)
            return [results[k] for k in indices]

        try:
            return run(list(range(len(jobs))))
        except Exception as batch_error:  # noqa: BLE001 - isolate the failing row below
            if len(jobs) == 1:
                return [batch_error]
        outcomes: list = []
        for k in range(len(jobs)):
            if k in streamed:
                outcomes.append(batch_error)
                continue
            try:
                outcomes.append(run([k])[0])
            except Exception as err:  # noqa: BLE001 - returned to that request's caller
                outcomes.append(err)
        return outcomes

    # -- API -------------------------------------------------------------------------------------
    async def generate(self, request: pb.GenerateRequest | pb.GenerateMultimodalRequest, received_at: float) -> pb.GenerateResponse:
        multimodal = isinstance(request, pb.GenerateMultimodalRequest)
        self._require_kind(MULTIMODAL_KINDS if multimodal else TEXT_KINDS, "GenerateMultimodal" if multimodal else "Generate")
        text_request = self._validated(convert.text_request_from_proto(request, self.sae_names, self.spec.limits.max_new_tokens))
        outcome = await self._text_batches.submit(_Job(text_request, received_at))
        result: rt.TextResult = outcome.result()
        timings = self._timings(outcome, received_at)
        steered = convert.is_steered(text_request)
        self._observe("generate", timings)
        self._observe_text(result, steered)
        return convert.text_result_to_proto(result, timings=timings, versions=self.versions, steered=steered)

    async def generate_stream(self, request: pb.GenerateRequest, received_at: float) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Token events as the request's batch produces them; the last message carries the full
        response. A stream joins batches like any Generate call."""
        self._require_kind(TEXT_KINDS, "GenerateStream")
        text_request = self._validated(convert.text_request_from_proto(request, self.sae_names, self.spec.limits.max_new_tokens))
        steered = convert.is_steered(text_request)
        tokens: asyncio.Queue = asyncio.Queue()
        outcome_of = asyncio.ensure_future(self._text_batches.submit(_Job(text_request, received_at, tokens)))
        # Scheduled after every token event of the pass (they are queued before it ends): the end marker.
        outcome_of.add_done_callback(lambda _: tokens.put_nowait(None))
        try:
            while (event := await tokens.get()) is not None:
                msg = pb.GenerateStreamResponse(token=convert.token_to_proto(event.token))
                if event.risk is not None:
                    msg.running_risk = event.risk
                yield msg
            outcome = outcome_of.result()
            result: rt.TextResult = outcome.result()
            timings = self._timings(outcome, received_at)
            self._observe("generate_stream", timings)
            self._observe_text(result, steered)
            yield pb.GenerateStreamResponse(final=convert.text_result_to_proto(result, timings=timings, versions=self.versions, steered=steered))
        finally:
            outcome_of.cancel()  # a client gone before its batch started leaves the queue

    async def generate_image(self, request: pb.GenerateImageRequest, received_at: float) -> pb.GenerateImageResponse:
        self._require_kind(IMAGE_KINDS, "GenerateImage")
        image_request = self._validated(convert.image_request_from_proto(request, self.sae_names))
        outcome = await self._image_batches.submit(_Job(image_request, received_at))
        result: rt.ImageResult = outcome.result()
        timings = self._timings(outcome, received_at)
        steered = convert.is_steered(image_request)
        self._observe("generate_image", timings)
        self.metrics.steered.inc(tags={"model": self.spec.name, "steered": "true" if steered else "false"})
        return convert.image_result_to_proto(result, timings=timings, versions=self.versions, steered=steered)

    async def encode(self, request: pb.EncodeRequest, received_at: float) -> pb.EncodeResponse:
        encode_request = self._validated(convert.encode_request_from_proto(request, self.sae_names))
        async with self._lock:
            started = time.time()
            result = await in_thread(self.backend.encode, encode_request)
            outcome = _Outcome(result, started, time.time(), 1)
        timings = self._timings(outcome, received_at)
        self._observe("encode", timings)
        return convert.encode_result_to_proto(result, timings=timings, versions=self.versions)

    async def evaluate_sae(self, request: pb.EvaluateSaeRequest, received_at: float) -> pb.EvaluateSaeResponse:
        from sae_runtime.evaluate import evaluate_backend_sae

        sae, texts, with_loss = convert.evaluate_sae_request_from_proto(request)
        async with self._lock:
            started = time.time()
            result = await in_thread(evaluate_backend_sae, self.backend, sae, texts, with_loss)
            outcome = _Outcome(result, started, time.time(), 1)
        timings = self._timings(outcome, received_at)
        self._observe("evaluate_sae", timings)
        return convert.evaluate_sae_result_to_proto(result, timings=timings, versions=self.versions)

    def model_info(self) -> pb.ModelInfo:
        return convert.model_info_to_proto(self.info)

    def search_features(self, request: pb.SearchFeaturesRequest) -> pb.SearchFeaturesResponse:
        """Labelled latents whose label contains ``query`` (case-insensitive), or the latent ``index``."""
        limit = request.limit or DEFAULT_SEARCH_LIMIT
        if not 0 < limit <= MAX_SEARCH_LIMIT:
            raise InvalidArgument(f"must be in [0, {MAX_SEARCH_LIMIT}]", field="limit")
        widths = {s.name: s.d_sae for s in self.info.saes}
        query = request.query.lower()
        found: list[pb.Feature] = []
        for name in (request.sae,) if request.sae else self.sae_names:
            labels = self.backend.feature_labels(name)  # NotFound(field="sae") for an unknown SAE
            if request.HasField("index"):
                if not 0 <= request.index < widths[name]:
                    raise InvalidArgument(f"latent {request.index} out of range [0, {widths[name]}) of SAE {name!r}", field="index")
                label = rt.label_of(labels, request.index) or ""
                if query in label.lower():
                    found.append(pb.Feature(sae=name, index=request.index, label=label))
                continue
            for label, index in sorted(labels.items(), key=lambda kv: (kv[1], kv[0])):
                if query in label.lower():
                    found.append(pb.Feature(sae=name, index=index, label=label))
        return pb.SearchFeaturesResponse(features=found[:limit])

    def ready(self) -> bool:
        return True
