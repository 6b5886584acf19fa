"""OpenAI's completions and chat-completions bodies <-> Steering protos.

A request becomes one ``GenerateRequest`` (or ``GenerateMultimodalRequest``, for a chat message
with an image) per choice; the ingress then serves it exactly as the gRPC RPC. Extensions, all
optional, which OpenAI clients send through ``extra_body``:

- ``steering``: an ``InterventionPlan`` in protobuf's JSON mapping (``{"edits": [{"sae": "res",
  "op": "EDIT_OP_SET", "labels": ["color:red"], "value": 60}], "scope": {"tokens": "TOKEN_SCOPE_ALL"}}``);
- ``include_default`` (the unsteered twin), ``return_latents`` (a ``LatentReadout``),
  ``mitigate_risk_top_n``: the ``GenerateRequest`` fields of the same names.

Each choice carries a ``steering`` object: the ``GenerateResponse`` in proto JSON without its
``completion`` (which is the choice): ``risk``, ``riskPrompt``, ``defaultCompletion``, latents,
``timings``. The response's own ``steering`` has ``steered`` and ``versions``.

Differences from OpenAI, by design: ``n`` > 1 with a ``seed`` gives choice ``i`` the seed
``seed + i`` (distinct samples, each reproducible); ``usage`` is absent (the service does not
report prompt token counts); ``echo``, ``best_of`` > 1, ``suffix``, ``logit_bias``,
``presence_penalty``, tools and token-id prompts are refused with 400 naming the field. Chat
content parts may be ``text`` or an ``image_url`` holding a ``data:`` URL (LLaVA models; no URL is
fetched); such a request does not stream token by token but as one chunk.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from steering.v1 import steering_pb2 as pb

from services.http import protojson
from services.http.errors import HttpError

MAX_N = 16
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    # -- steering extensions -------------------------------------------------------------------
    steering: dict[str, Any] | None = Field(None, description="An InterventionPlan in protobuf's JSON mapping.")
    include_default: bool = Field(False, description="Also generate the unsteered twin (same seed).")
    return_latents: dict[str, Any] | None = Field(None, description="A LatentReadout in protobuf's JSON mapping.")
    mitigate_risk_top_n: int = Field(0, ge=0, description="Ablate the risk probe's N most risk-positive latents.")


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessageBody] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None


# -- requests -----------------------------------------------------------------------------------


def _refuse_unsupported(body: _Body) -> None:
    unsupported = {
        "echo": getattr(body, "echo", False),
        "best_of": (getattr(body, "best_of", None) or 1) > 1,
        "suffix": bool(getattr(body, "suffix", None)),
        "logit_bias": bool(getattr(body, "logit_bias", None)),
        "presence_penalty": body.presence_penalty != 0,
        "tools": bool(getattr(body, "tools", None)),
    }
    for field, used in unsupported.items():
        if used:
            raise HttpError.invalid(field, "is not supported by this service")


def _common(body: _Body, n_logprobs: int, max_tokens: int | None) -> dict[str, Any]:
    """GenerateRequest fields shared by both endpoints (everything but prompt/messages/seed)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = pb.GenerationParams(temperature=body.temperature, frequency_penalty=body.frequency_penalty, stop=stop)
    if max_tokens is not None:
        params.max_new_tokens = max_tokens
    if body.top_p is not None:
        params.top_p = body.top_p
    fields: dict[str, Any] = {
        "model": body.model,
        "params": params,
        "include_default": body.include_default,
        "return_logprobs": n_logprobs,
        "mitigate_risk_top_n": body.mitigate_risk_top_n,
    }
    if body.steering is not None:
        fields["plan"] = protojson.parse(body.steering, pb.InterventionPlan, "steering")
    if body.return_latents is not None:
        fields["return_latents"] = protojson.parse(body.return_latents, pb.LatentReadout, "return_latents")
    return fields


def _seeded(fields: dict[str, Any], seed: int | None, n: int, message_type=pb.GenerateRequest) -> list:
    """``n`` requests; choice ``i`` gets ``seed + i`` when a seed is given."""
    return [message_type(**fields, **({} if seed is None else {"seed": seed + i})) for i in range(n)]


def completion_requests(body: CompletionBody) -> list[pb.GenerateRequest]:
    """One GenerateRequest per choice: prompt ``p`` (of a list) times ``n``, in OpenAI's order."""
    _refuse_unsupported(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise HttpError.invalid("prompt", "give a prompt")
    fields = _common(body, body.logprobs or 0, body.max_tokens)
    return [r for p in prompts for r in _seeded({**fields, "prompt": p}, body.seed, body.n)]


def _data_url_bytes(url: str, field: str) -> bytes:
    if not url.startswith("data:") or ";base64," not in url:
        raise HttpError.invalid(field, "must be a data: URL with base64 content (this service fetches no URLs)")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise HttpError.invalid(field, "is not valid base64") from None


def chat_requests(body: ChatBody) -> list[pb.GenerateRequest | pb.GenerateMultimodalRequest]:
    """One request per choice; a message with an ``image_url`` part makes them multimodal."""
    _refuse_unsupported(body)
    messages, image = [], None
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                field = f"messages[{i}].content[{j}]"
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    if image is not None:
                        raise HttpError.invalid(field, "only one image per request")
                    url = (part.get("image_url") or {}).get("url", "")
                    image = _data_url_bytes(url, f"{field}.image_url.url")
                else:
                    raise HttpError.invalid(f"{field}.type", "must be 'text' or 'image_url'")
            content = "".join(texts)
        else:
            content = m.content or ""
        messages.append(pb.ChatMessage(role=m.role, content=content))
    n_logprobs = max(1, body.top_logprobs or 0) if body.logprobs else 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    fields = {**_common(body, n_logprobs, max_tokens), "messages": messages}
    if image is not None:
        return _seeded({**fields, "image": image}, body.seed, body.n, pb.GenerateMultimodalRequest)
    return _seeded(fields, body.seed, body.n)


def field_renamer(chat: bool):
    """Proto field path -> the OpenAI request's name for it, for errors from the service."""
    renames = (
        ("plan", "steering"),
        ("params.max_new_tokens", "max_completion_tokens" if chat else "max_tokens"),
        ("params", ""),  # params.temperature -> temperature
        ("return_logprobs", "top_logprobs" if chat else "logprobs"),
        ("image", "messages"),
    )

    def rename(field: str) -> str:
        for proto, openai in renames:
            if field == proto or field.startswith((proto + ".", proto + "[")):
                rest = field[len(proto) :]
                return openai + rest if openai else rest.lstrip(".")
        return field

    return rename


# -- responses ----------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def choice_steering(response: pb.GenerateResponse) -> dict[str, Any]:
    """The response's steering object for one choice: everything but the completion itself and the
    request-wide ``steered`` / ``versions``."""
    d = protojson.dump(response)
    for key in ("completion", "versions", "steered"):
        d.pop(key, None)
    return d


def response_steering(response: pb.GenerateResponse) -> dict[str, Any]:
    return {"steered": response.steered, "versions": protojson.dump(response.versions)}


def completion_logprobs(tokens: list[pb.Token], n: int, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy completions ``logprobs`` object for ``tokens`` (None when not asked)."""
    if not n:
        return None
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob if t.HasField("logprob") else None for t in tokens],
        "top_logprobs": [{lp.token: lp.logprob for lp in t.top_logprobs[:n]} for t in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[pb.Token], top: int | None, asked: bool) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs`` object (``content``: one entry per token) for ``tokens``."""
    if not asked:
        return None

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(t.text, t.logprob), "top_logprobs": [entry(lp.token, lp.logprob) for lp in t.top_logprobs[: top or 0]]}
            for t in tokens
        ],
        "refusal": None,
    }


def completion_response(body: CompletionBody, responses: list[pb.GenerateResponse]) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "text": r.completion.text,
            "finish_reason": FINISH_REASONS.get(r.completion.finish_reason, r.completion.finish_reason),
            "logprobs": completion_logprobs(list(r.completion.tokens), body.logprobs or 0),
            "steering": choice_steering(r),
        }
        for i, r in enumerate(responses)
    ]
    return {
        "id": new_id(False),
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": responses[0].versions.model_version,
        "choices": choices,
        "steering": response_steering(responses[0]),
    }


def chat_response(body: ChatBody, responses: list[pb.GenerateResponse]) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.completion.text},
            "finish_reason": FINISH_REASONS.get(r.completion.finish_reason, r.completion.finish_reason),
            "logprobs": chat_logprobs(list(r.completion.tokens), body.top_logprobs, body.logprobs),
            "steering": choice_steering(r),
        }
        for i, r in enumerate(responses)
    ]
    return {
        "id": new_id(True),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": responses[0].versions.model_version,
        "choices": choices,
        "steering": response_steering(responses[0]),
    }


class ChunkWriter:
    """OpenAI's streaming chunks (``text_completion`` or ``chat.completion.chunk``) of one response."""

    def __init__(self, body: CompletionBody | ChatBody, chat: bool) -> None:
        self.body, self.chat = body, chat
        self.id, self.created = new_id(chat), int(time.time())
        self._offsets: dict[int, int] = {}

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.body.model,
            "choices": [choice],
            **extra,
        }

    def opening(self, index: int) -> dict[str, Any] | None:
        """Chat streams open each choice with the assistant role."""
        if not self.chat:
            return None
        opening = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._chunk(opening)

    def token(self, index: int, message: pb.GenerateStreamResponse) -> dict[str, Any]:
        token = message.token
        choice: dict[str, Any] = {"index": index, "finish_reason": None}
        if self.chat:
            choice["delta"] = {"content": token.text}
            choice["logprobs"] = chat_logprobs([token], self.body.top_logprobs, self.body.logprobs)
        else:
            offset = self._offsets.get(index, 0)
            choice["text"] = token.text
            choice["logprobs"] = completion_logprobs([token], self.body.logprobs or 0, offset)
            self._offsets[index] = offset + len(token.text)
        steering: dict[str, Any] = {"token": protojson.dump(token)}
        if message.HasField("running_risk"):
            steering["runningRisk"] = message.running_risk
        choice["steering"] = steering
        return self._chunk(choice)

    def final(self, index: int, response: pb.GenerateResponse) -> dict[str, Any]:
        finish = FINISH_REASONS.get(response.completion.finish_reason, response.completion.finish_reason)
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        choice["steering"] = choice_steering(response)
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return self._chunk(choice, steering=response_steering(response))

    def whole(self, index: int, response: pb.GenerateResponse) -> list[dict[str, Any]]:
        """A response that was not streamed token by token (multimodal), as chunks."""
        text = {"delta": {"content": response.completion.text}} if self.chat else {"text": response.completion.text}
        content = self._chunk({"index": index, "finish_reason": None, "logprobs": None, **text})
        return [c for c in (self.opening(index), content, self.final(index, response)) if c is not None]
