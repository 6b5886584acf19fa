"""A typed Python client for the steering service (plain gRPC; no Ray needed).

    from services.client import Generation, SteeringClient, edit

    with SteeringClient("localhost:9000") as client:
        out = client.generate("demo-lm", "the", edits=[edit("concepts", "set", "color:red", value=60)],
                              generation=Generation(max_new_tokens=12), include_default=True, seed=0)
        print(out.completion.text, "| unsteered:", out.default_completion.text, "| risk:", out.risk.score)

        # a strength sweep in one call, a preset, an inline steering vector, a stop condition
        sweep = client.generate("demo-lm", "the", variants=[plan([edit("concepts", "set", "color:red", value=v)])
                                                            for v in (10, 30, 60)], seed=0)
        red = client.generate("demo-lm", "the", presets=["red"], stop_when=when("concepts", "animal:cat", above=4.0))
        d = client.compute_steering_vector("demo-lm", ["the red"], ["the blue"], sae="concepts")
        client.generate("demo-lm", "the", vectors=[vector(values=d.values, site=d.site, value=4.0)])

Methods return the response proto messages (typed by the generated ``.pyi`` stubs). Failures
raise :class:`SteeringError` with the gRPC status ``code``, the ``details``, the request ``field``
they name, and the structured details the service sends in ``grpc-status-details-bin``
(``google.rpc.BadRequest`` field violations, ``ResourceInfo``, ``QuotaFailure``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: The trailer holding the serialized google.rpc.Status of a failed call.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

OPS = {
    "set": pb.EDIT_OP_SET,
    "ablate": pb.EDIT_OP_ABLATE,
    "scale": pb.EDIT_OP_SCALE,
    "add": pb.EDIT_OP_ADD,
    "cap": pb.EDIT_OP_CAP,
    "project_set": pb.EDIT_OP_PROJECT_SET,
    "project_cap": pb.EDIT_OP_PROJECT_CAP,
}
#: Ops a steering vector takes.
VECTOR_OPS = ("add", "project_set", "project_cap")
TOKEN_SCOPES = {"all": pb.TOKEN_SCOPE_ALL, "prompt": pb.TOKEN_SCOPE_PROMPT, "generated": pb.TOKEN_SCOPE_GENERATED}


class SteeringError(Exception):
    """A failed call: ``code`` (grpc.StatusCode), ``details``, the request ``field`` named (if any), and
    the decoded google.rpc details: ``field_violations`` [(field, description)] (INVALID_ARGUMENT),
    ``resource`` (type, name) (NOT_FOUND), ``quota_violations`` [(subject, description)]
    (RESOURCE_EXHAUSTED). ``status`` is the whole google.rpc.Status, or None when the server sent none."""

    def __init__(self, code: grpc.StatusCode, details: str, status: status_pb2.Status | None = None) -> None:
        self.code = code
        self.details = details
        self.status = status
        self.field_violations: list[tuple[str, str]] = []
        self.quota_violations: list[tuple[str, str]] = []
        self.resource: tuple[str, str] | None = None
        for packed in status.details if status is not None else ():
            if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                packed.Unpack(bad)
                self.field_violations += [(v.field, v.description) for v in bad.field_violations]
            elif packed.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                packed.Unpack(quota)
                self.quota_violations += [(v.subject, v.description) for v in quota.violations]
            elif packed.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                info = error_details_pb2.ResourceInfo()
                packed.Unpack(info)
                self.resource = (info.resource_type, info.resource_name)
        named = [f for f, _ in self.field_violations + self.quota_violations if f]
        match = re.match(r"^([A-Za-z_][\w.\[\]]*): ", details or "")
        self.field = named[0] if named else (match.group(1) if match else None)
        super().__init__(f"{code.name}: {details}")

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "SteeringError":
        """Decode a failed call, reading the google.rpc.Status in its grpc-status-details-bin trailer."""
        status = None
        for key, value in (err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else ():
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
        return cls(err.code(), err.details() or "", status)


def edit(
    sae: str,
    op: str,
    *targets: int | str,
    value: float = 0.0,
    normalize: bool = False,
    condition: pb.Condition | None = None,
    describe: str = "",
    top_n: int = 0,
) -> pb.LatentEdit:
    """One latent edit; ``targets`` are latent indices (int) or concept labels (str); ``describe``
    names latents by meaning instead (the ``top_n`` best-matching labels); ``condition`` (see
    :func:`when`) limits it to the positions where it holds."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    msg = pb.LatentEdit(
        sae=sae,
        op=OPS[op],
        latents=[t for t in targets if isinstance(t, int)],
        labels=[t for t in targets if isinstance(t, str)],
        value=value,
        normalize=normalize,
        describe=describe,
        top_n=top_n,
    )
    if condition is not None:
        msg.condition.CopyFrom(condition)
    return msg


def when(sae: str, latent: int | str, *, above: float | None = None, below: float | None = None) -> pb.Condition:
    """A condition leaf: latent (index or label) of ``sae`` above (or below) a threshold."""
    if (above is None) == (below is None):
        raise ValueError("give exactly one of above= or below=")
    msg = pb.Condition(sae=sae, compare=pb.COMPARE_ABOVE if above is not None else pb.COMPARE_BELOW,
                       threshold=above if above is not None else below)  # fmt: skip
    if isinstance(latent, int):
        msg.latent = latent
    else:
        msg.label = latent
    return msg


def all_of(*conditions: pb.Condition) -> pb.Condition:
    """True where every condition holds (AND)."""
    return pb.Condition(all_of=list(conditions))


def any_of(*conditions: pb.Condition) -> pb.Condition:
    """True where any condition holds (OR)."""
    return pb.Condition(any_of=list(conditions))


def vector(
    name: str = "",
    *,
    values: Sequence[float] = (),
    site: str = "",
    op: str = "add",
    value: float = 1.0,
    normalize: bool = False,
    condition: pb.Condition | None = None,
) -> pb.VectorEdit:
    """A steering-vector edit: a declared vector by ``name``, or inline ``values`` at ``site``."""
    if op not in VECTOR_OPS:
        raise ValueError(f"a vector op is one of {', '.join(VECTOR_OPS)}, got {op!r}")
    msg = pb.VectorEdit(vector=name, values=list(values), site=site, op=OPS[op], value=value, normalize=normalize)
    if condition is not None:
        msg.condition.CopyFrom(condition)
    return msg


def plan(
    edits: Iterable[pb.LatentEdit] = (),
    *,
    tokens: str = "all",
    preserve_error: bool = True,
    step_start: int = 0,
    step_end: int | None = None,
    vectors: Iterable[pb.VectorEdit] = (),
    presets: Sequence[str] = (),
    stop_when: pb.Condition | None = None,
) -> pb.InterventionPlan:
    """An InterventionPlan: latent edits, steering vectors, presets by name, a stop condition."""
    msg = pb.InterventionPlan(edits=list(edits), preserve_error=preserve_error, vectors=list(vectors), presets=list(presets))
    if stop_when is not None:
        msg.stop_when.CopyFrom(stop_when)
    msg.scope.tokens = TOKEN_SCOPES[tokens]
    msg.scope.step_start = step_start
    if step_end is not None:
        msg.scope.step_end = step_end
    return msg


@dataclass(frozen=True)
class Generation:
    """Text generation settings shared by generate / stream / generate_multimodal."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()

    def to_proto(self) -> pb.GenerationParams:
        msg = pb.GenerationParams(
            temperature=self.temperature, top_k=self.top_k, frequency_penalty=self.frequency_penalty, stop=list(self.stop)
        )
        if self.max_new_tokens is not None:
            msg.max_new_tokens = self.max_new_tokens
        if self.top_p is not None:
            msg.top_p = self.top_p
        if self.repetition_penalty is not None:
            msg.repetition_penalty = self.repetition_penalty
        return msg


class SteeringClient:
    """Blocking client. ``token`` adds ``authorization: Bearer <token>`` to every call."""

    def __init__(
        self,
        target: str = "localhost:9000",
        *,
        token: str | None = None,
        timeout: float | None = 120.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        self._stub = steering_pb2_grpc.SteeringStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SteeringClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc, request):
        try:
            return rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise SteeringError.from_rpc_error(err) from None

    # -- requests ----------------------------------------------------------------------------------
    @staticmethod
    def text_request(
        model: str,
        prompt: str = "",
        *,
        edits: Iterable[pb.LatentEdit] = (),
        intervention: pb.InterventionPlan | None = None,
        vectors: Iterable[pb.VectorEdit] = (),
        presets: Sequence[str] = (),
        stop_when: pb.Condition | None = None,
        variants: Iterable[pb.InterventionPlan] = (),
        messages: Sequence[tuple[str, str]] = (),
        generation: Generation = Generation(),
        seed: int | None = None,
        include_default: bool = False,
        return_latents: Sequence[str] | bool = False,
        latents_top_k: int = 5,
        return_logprobs: int = 0,
        mitigate_risk_top_n: int = 0,
        image: bytes | None = None,
    ) -> pb.GenerateRequest | pb.GenerateMultimodalRequest:
        """A GenerateRequest (a GenerateMultimodalRequest when ``image`` is given).
        ``return_latents``: True = every SAE, or a list of SAE names. The plan is ``intervention``,
        or one built from ``edits``, ``vectors``, ``presets`` and ``stop_when``; ``variants``: more
        plans run beside it (one ``response.variants`` entry each)."""
        cls = pb.GenerateRequest if image is None else pb.GenerateMultimodalRequest
        if intervention is not None and (list(edits) or list(vectors) or list(presets) or stop_when is not None):
            raise ValueError("give intervention or edits/vectors/presets/stop_when, not both")
        msg = cls(
            model=model,
            prompt=prompt,
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
            plan=intervention if intervention is not None else plan(edits, vectors=vectors, presets=presets, stop_when=stop_when),
            variants=list(variants),
            params=generation.to_proto(),
            include_default=include_default,
            return_logprobs=return_logprobs,
            mitigate_risk_top_n=mitigate_risk_top_n,
        )
        if image is not None:
            msg.image = image
        if seed is not None:
            msg.seed = seed
        if return_latents:
            names = [] if return_latents is True else list(return_latents)
            msg.return_latents.CopyFrom(pb.LatentReadout(saes=names, top_k=latents_top_k))
        return msg

    def generate(self, model: str, prompt: str = "", **options) -> pb.GenerateResponse:
        """Steered text generation; ``options`` as :meth:`text_request`."""
        return self._call(self._stub.Generate, self.text_request(model, prompt, **options))

    def generate_request(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return self._call(self._stub.Generate, request)

    def stream(self, model: str, prompt: str = "", **options) -> Iterator[pb.GenerateStreamResponse]:
        """Token by token; the last message has ``final`` set."""
        request = self.text_request(model, prompt, **options)
        try:
            yield from self._stub.GenerateStream(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise SteeringError.from_rpc_error(err) from None

    def generate_multimodal(self, model: str, image: bytes, prompt: str = "", **options) -> pb.GenerateResponse:
        """Image + text generation (LLaVA); ``options`` as :meth:`text_request`."""
        return self._call(self._stub.GenerateMultimodal, self.text_request(model, prompt, image=image, **options))

    def generate_image(
        self,
        model: str,
        prompt: str,
        *,
        edits: Iterable[pb.LatentEdit] = (),
        intervention: pb.InterventionPlan | None = None,
        negative_prompt: str = "",
        num_inference_steps: int | None = None,
        guidance_scale: float = 0.0,
        height: int = 0,
        width: int = 0,
        seed: int | None = None,
        include_default: bool = False,
        return_latents: Sequence[str] | bool = False,
        latents_top_k: int = 5,
    ) -> pb.GenerateImageResponse:
        msg = pb.GenerateImageRequest(
            model=model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            plan=intervention if intervention is not None else plan(edits),
            include_default=include_default,
        )
        if num_inference_steps is not None:
            msg.num_inference_steps = num_inference_steps
        if seed is not None:
            msg.seed = seed
        if return_latents:
            names = [] if return_latents is True else list(return_latents)
            msg.return_latents.CopyFrom(pb.LatentReadout(saes=names, top_k=latents_top_k))
        return self._call(self._stub.GenerateImage, msg)

    def encode(
        self, model: str, text: str = "", *, image: bytes | None = None, saes: Sequence[str] = (), top_k: int = 5
    ) -> pb.EncodeResponse:
        return self._call(
            self._stub.Encode, pb.EncodeRequest(model=model, text=text, image=image or b"", saes=list(saes), top_k=top_k)
        )

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def search_features(
        self, model: str, query: str = "", *, sae: str = "", index: int | None = None, limit: int = 20,
        semantic: bool | None = None,
    ) -> list[pb.Feature]:
        """Latents by label substring, by meaning (``semantic=True``; None = the service's default) or index."""
        msg = pb.SearchFeaturesRequest(model=model, sae=sae, query=query, limit=limit)
        if index is not None:
            msg.index = index
        if semantic is not None:
            msg.semantic = semantic
        return list(self._call(self._stub.SearchFeatures, msg).features)

    def compute_steering_vector(
        self, model: str, positive: Sequence[str], negative: Sequence[str], *, site: str = "", sae: str = "", top_n: int = 0
    ) -> pb.ComputeSteeringVectorResponse:
        """DiffMean of the activations at ``site`` (default: ``sae``'s site) between two prompt
        sets; with ``sae``, its ``top_n`` decoder rows closest by cosine."""
        msg = pb.ComputeSteeringVectorRequest(model=model, positive=list(positive), negative=list(negative), site=site,
                                              sae=sae, top_n=top_n)  # fmt: skip
        return self._call(self._stub.ComputeSteeringVector, msg)

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
