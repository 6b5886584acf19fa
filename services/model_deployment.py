"""One Ray Serve deployment per configured model (or, colocated, one object per model inside the
ingress replica: :mod:`services.local_models`): validate each request once, hand it to the engine.

Every request is converted and validated on its own (``Backend.validate``: tokenised, labels
resolved, image decoded, once) before it reaches the engine, so a bad request fails alone with a
status naming its field. Text models (causal LM, LLaVA) run the backend's continuous-batching
engine (:mod:`sae_runtime.engine`) on a thread of the replica: Generate and GenerateStream
requests are submitted to it and join the running rows at the next step; token events come back
from the engine thread into this replica's event loop as they are produced. A client that goes
away cancels its request, which leaves at the next step boundary. Image models run request-level
batches (:class:`sae_runtime.engine.images.ImageBatches`) on the same queue discipline. Encode,
EvaluateSae and ComputeSteeringVector run on the engine's thread between steps (the engine's
hooks share the model's modules). With ``engine.separate_process`` a text model's generation
steps in a child process instead (:class:`sae_runtime.engine.process.EngineProcess`); this
replica's backend still validates every request and runs those other calls on its engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator

from ray import serve
from steering.v1 import steering_pb2 as pb

from sae_runtime.backends import types as rt
from sae_runtime.backends.feature_search import search_features
from sae_runtime.backends.registry import build_backend, demo_spec
from sae_runtime.backends.spec import ModelSpec
from sae_runtime.engine import StepStats
from sae_runtime.engine.images import ImageBatches, ImageRun
from sae_runtime.engine.process import EngineProcess
from sae_runtime.errors import InvalidArgument, SaeRuntimeError, Unavailable
from sae_runtime.versions import fingerprint
from services import convert
from services.metrics import model_metrics

DEFAULT_SEARCH_LIMIT = 20

#: Which RPC families a model kind serves.
TEXT_KINDS = ("causal_lm", "llava")
MULTIMODAL_KINDS = ("llava",)
IMAGE_KINDS = ("sdxl_turbo",)


@serve.deployment
class ModelServer:
    """A replica holding one loaded backend. Methods take and return proto messages."""

    def __init__(self, spec: ModelSpec, torch_threads: int | None = None, demo: bool = False) -> None:
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
        self._tags = {"model": spec.name}
        self.generation: EngineProcess | None = None
        if self.info.kind in TEXT_KINDS:
            self.engine = self.backend.engine
            self.loop = self.engine
            if spec.engine.separate_process:
                self.engine = self.generation = EngineProcess(spec, torch_threads)
                self.generation.start()
            self.engine.on_step = self._on_step
        else:
            self.images = ImageBatches(self.backend.generate_images, spec.engine.max_running_rows)
            self.loop = self.images
        self.loop.start()

    def __del__(self) -> None:
        for running in (getattr(self, "loop", None), getattr(self, "generation", None)):
            if running is not None:
                running.stop()

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

    def _text_request(self, request: pb.GenerateRequest | pb.GenerateMultimodalRequest) -> rt.TextRequest:
        limits = self.spec.limits
        return convert.text_request_from_proto(request, self.sae_names, limits.max_new_tokens, limits)

    def _timings(self, timings: rt.Timings, received_at: float) -> pb.Timings:
        return pb.Timings(
            queue_ms=timings.queue_ms,
            compute_ms=timings.compute_ms,
            total_ms=max(0.0, time.time() - received_at) * 1e3,
            batch_size=timings.batch_size,
        )

    def _observe(self, method: str, timings: pb.Timings) -> None:
        tags = {**self._tags, "method": method}
        self.metrics.queue_ms.observe(timings.queue_ms, tags=tags)
        self.metrics.compute_ms.observe(timings.compute_ms, tags=tags)
        self.metrics.batch_size.observe(timings.batch_size, tags=tags)

    def _observe_text(self, result: rt.TextResult, steered: bool) -> None:
        n_tokens = len(result.steered.tokens) + (len(result.default.tokens) if result.default else 0)
        if n_tokens:
            self.metrics.tokens.inc(n_tokens, tags=self._tags)
        self.metrics.steered.inc(tags={**self._tags, "steered": "true" if steered else "false"})
        if result.risk_final is not None:
            self.metrics.risk.observe(result.risk_final.probability, tags=self._tags)

    def _on_step(self, stats: StepStats) -> None:
        """(Engine thread.) Gauges and histograms of one engine step."""
        m, tags = self.metrics, self._tags
        m.running_rows.set(stats.running_rows, tags=tags)
        m.waiting.set(stats.waiting, tags=tags)
        m.kv_tokens.set(stats.kv_tokens, tags=tags)
        m.step_ms.observe(stats.step_ms, tags=tags)
        for v in stats.first_token_ms:
            m.first_token_ms.observe(v, tags=tags)
        for v in stats.inter_token_ms:
            m.inter_token_ms.observe(v, tags=tags)

    async def _text_events(self, prepared: Any, stream: bool) -> AsyncIterator[rt.StreamEvent]:
        """The engine's events for one request, in this event loop; the request is cancelled in
        the engine if the caller stops listening (client gone) before it ended."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        run = self.engine.submit(prepared, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), stream=stream)
        try:
            while True:
                event = await events.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.result is not None:
                    return
        finally:
            if not run.done.is_set():
                self.engine.cancel(run)

    async def _image(self, request: Any) -> ImageRun:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        run = self.images.submit(request, lambda r: loop.call_soon_threadsafe(_resolve, done, r))
        try:
            return await asyncio.shield(done)
        finally:
            if not run.done.is_set():
                self.images.cancel(run)

    # -- API -------------------------------------------------------------------------------------
    async def generate(self, request: pb.GenerateRequest | pb.GenerateMultimodalRequest, received_at: float) -> pb.GenerateResponse:
        multimodal = isinstance(request, pb.GenerateMultimodalRequest)
        self._require_kind(MULTIMODAL_KINDS if multimodal else TEXT_KINDS, "GenerateMultimodal" if multimodal else "Generate")
        prepared = self._validated(self._text_request(request))
        result: rt.TextResult | None = None
        async for event in self._text_events(prepared, stream=False):
            result = event.result
        timings = self._timings(result.timings, received_at)
        steered = convert.is_steered(prepared.request)
        self._observe("generate", timings)
        self._observe_text(result, steered)
        return convert.text_result_to_proto(result, timings=timings, versions=self.versions, steered=steered)

    async def generate_stream(self, request: pb.GenerateRequest, received_at: float) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Token events as the engine makes them ready; the last message carries the full response."""
        self._require_kind(TEXT_KINDS, "GenerateStream")
        prepared = self._validated(self._text_request(request))
        steered = convert.is_steered(prepared.request)
        # aclosing: a caller that stops reading closes this generator at its yield, and an
        # async-for does not close the generator it iterates. Without it the engine's row is
        # cancelled only when the event loop finalizes the abandoned generator, after whatever the
        # caller does next (a request submitted at once shared a step with the abandoned row).
        async with contextlib.aclosing(self._text_events(prepared, stream=True)) as events:
            async for event in events:
                if event.result is None:
                    msg = pb.GenerateStreamResponse(token=convert.token_to_proto(event.token))
                    if event.risk is not None:
                        msg.running_risk = event.risk
                    yield msg
                    continue
                timings = self._timings(event.result.timings, received_at)
                self._observe("generate_stream", timings)
                self._observe_text(event.result, steered)
                yield pb.GenerateStreamResponse(final=convert.text_result_to_proto(event.result, timings=timings, versions=self.versions, steered=steered))

    async def generate_image(self, request: pb.GenerateImageRequest, received_at: float) -> pb.GenerateImageResponse:
        self._require_kind(IMAGE_KINDS, "GenerateImage")
        image_request = self._validated(convert.image_request_from_proto(request, self.sae_names))
        run = await self._image(image_request)
        if run.error is not None:
            raise run.error
        timings = self._timings(rt.Timings(queue_ms=(run.started - run.submitted) * 1e3, compute_ms=(run.finished - run.started) * 1e3,
                                           batch_size=run.batch_size), received_at)
        steered = convert.is_steered(image_request)
        self._observe("generate_image", timings)
        self.metrics.steered.inc(tags={**self._tags, "steered": "true" if steered else "false"})
        return convert.image_result_to_proto(run.result, timings=timings, versions=self.versions, steered=steered)

    async def encode(self, request: pb.EncodeRequest, received_at: float) -> pb.EncodeResponse:
        encode_request = self._validated(convert.encode_request_from_proto(request, self.sae_names))
        started = time.time()
        if self.info.kind in TEXT_KINDS:
            result = await asyncio.to_thread(self.backend.encode, encode_request)  # runs on the engine thread
        else:
            result = await asyncio.wrap_future(self.images.call(lambda: self.backend.encode(encode_request)))
        timings = self._timings(rt.Timings(compute_ms=(time.time() - started) * 1e3), received_at)
        self._observe("encode", timings)
        return convert.encode_result_to_proto(result, timings=timings, versions=self.versions)

    async def evaluate_sae(self, request: pb.EvaluateSaeRequest, received_at: float) -> pb.EvaluateSaeResponse:
        from sae_runtime.evaluate import evaluate_backend_sae

        sae, texts, with_loss = convert.evaluate_sae_request_from_proto(request)
        started = time.time()  # runs on the engine's thread between steps, like Encode
        result = await asyncio.wrap_future(self.loop.call(lambda: evaluate_backend_sae(self.backend, sae, texts, with_loss)))
        timings = self._timings(rt.Timings(compute_ms=(time.time() - started) * 1e3), received_at)
        self._observe("evaluate_sae", timings)
        return convert.evaluate_sae_result_to_proto(result, timings=timings, versions=self.versions)

    async def compute_steering_vector(self, request: pb.ComputeSteeringVectorRequest, received_at: float) -> pb.ComputeSteeringVectorResponse:
        """DiffMean between two prompt sets at a hook site. Like ``encode``, the backend's method runs
        its forwards on the engine's thread between steps (it waits on ``engine.call``), so it is
        called from a worker thread here, never from the engine's own."""
        self._require_kind(TEXT_KINDS, "ComputeSteeringVector")
        sites = {s.name: s.hook_name for s in self.info.saes}
        vector_request = convert.steering_vector_request_from_proto(request, self.spec.limits, sites)
        started = time.time()
        result = await asyncio.to_thread(self.backend.compute_steering_vector, vector_request)
        timings = self._timings(rt.Timings(compute_ms=(time.time() - started) * 1e3), received_at)
        self._observe("compute_steering_vector", timings)
        return convert.steering_vector_result_to_proto(result, timings=timings, versions=self.versions)

    def model_info(self) -> pb.ModelInfo:
        return convert.model_info_to_proto(self.info, self.versions)

    def search_features(self, request: pb.SearchFeaturesRequest) -> pb.SearchFeaturesResponse:
        """Labelled latents by meaning or by label substring (case-insensitive), or the latent ``index``."""
        found = search_features(self.backend, request.query, request.sae, request.index if request.HasField("index") else None,
                                   request.limit or DEFAULT_SEARCH_LIMIT, **convert.search_options_from_proto(request))
        return pb.SearchFeaturesResponse(features=[convert.feature_to_proto(f) for f in found])

    def ready(self) -> bool:
        return self.generation is None or self.generation.alive

    def check_health(self) -> None:
        """Ray Serve's replica health check: a replica whose engine process died is restarted."""
        if not self.ready():
            raise Unavailable(f"the engine process of {self.spec.name!r} is gone")


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)
