"""A typed Python client for the steering service (plain gRPC; no Ray needed).

    from services.client import Generation, SteeringClient, edit

    with SteeringClient("localhost:9000") as client:
        out = client.generate("demo-lm", "the", edits=[edit("concepts", "set", "color:red", value=60)],
                              generation=Generation(max_new_tokens=12), include_default=True, seed=0)
        print(out.completion.text, "| unsteered:", out.default_completion.text, "| risk:", out.risk.score)

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
}
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


def edit(sae: str, op: str, *targets: int | str, value: float = 0.0, normalize: bool = False) -> pb.LatentEdit:
    """One latent edit; ``targets`` are latent indices (int) or concept labels (str)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    return pb.LatentEdit(
        sae=sae,
        op=OPS[op],
        latents=[t for t in targets if isinstance(t, int)],
        labels=[t for t in targets if isinstance(t, str)],
        value=value,
        normalize=normalize,
    )


def plan(
    edits: Iterable[pb.LatentEdit] = (),
    *,
    tokens: str = "all",
    preserve_error: bool = True,
    step_start: int = 0,
    step_end: int | None = None,
) -> pb.InterventionPlan:
    msg = pb.InterventionPlan(edits=list(edits), preserve_error=preserve_error)
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
        ``return_latents``: True = every SAE, or a list of SAE names."""
        cls = pb.GenerateRequest if image is None else pb.GenerateMultimodalRequest
        msg = cls(
            model=model,
            prompt=prompt,
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
            plan=intervention if intervention is not None else plan(edits),
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
        self, model: str, query: str = "", *, sae: str = "", index: int | None = None, limit: int = 20
    ) -> list[pb.Feature]:
        msg = pb.SearchFeaturesRequest(model=model, sae=sae, query=query, limit=limit)
        if index is not None:
            msg.index = index
        return list(self._call(self._stub.SearchFeatures, msg).features)

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
