"""Request validation and prompt tokenisation for the causal-LM backend.

Errors name the request field, prefixed by the caller's ``field_prefix`` (``"requests[2]."`` in a
batch): ``prompt``, ``messages[1].role``, ``sampling.top_p``, ``plan.edits[0].latents``,
``readout.saes[0]``, ``logprobs``, ``mitigate_risk_top_n``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

from sae_runtime.backends.sampling import new_generator
from sae_runtime.backends.types import ChatMessage, EncodeRequest, SamplingParams, TextRequest
from sae_runtime.engine.request import PreparedText
from sae_runtime.errors import InvalidArgument, NotFound, TooLarge, require_finite
from sae_runtime.plan import check_scope_applies, check_seed

if TYPE_CHECKING:
    from sae_runtime.backends.causal_lm import CausalLmBackend

#: Most top log-probs a request may ask for per token.
MAX_LOGPROBS = 20


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def prompt_token_ids(backend: "CausalLmBackend", prompt: str, messages: Sequence[ChatMessage], field: str, field_prefix: str = "") -> list[int]:
    """Token ids of a plain prompt (with the tokenizer's special tokens, e.g. BOS) or of chat
    ``messages`` rendered by the tokenizer's chat template with the generation prompt appended.

    InvalidArgument for an empty prompt, both prompt and messages, or chat without a template;
    TooLarge beyond ``limits.max_prompt_tokens``.
    """
    p, tok = field_prefix, backend.tokenizer
    if messages:
        if prompt:
            raise InvalidArgument("give either prompt or messages, not both", field=f"{p}messages")
        if not getattr(tok, "chat_template", None):
            raise InvalidArgument(f"model {backend.name!r} has no chat template; send a plain prompt", field=f"{p}messages")
        for n, m in enumerate(messages):
            if not isinstance(m.role, str) or not m.role:
                raise InvalidArgument("role must be a non-empty string", field=f"{p}messages[{n}].role")
            if not isinstance(m.content, str):
                raise InvalidArgument("content must be a string", field=f"{p}messages[{n}].content")
        text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, tokenize=False)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        field = "messages"
    else:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgument("empty prompt (give prompt or messages)", field=f"{p}{field}")
        ids = list(tok(prompt)["input_ids"])
    if not ids:
        raise InvalidArgument("the prompt encodes to no tokens", field=f"{p}{field}")
    limit = backend.limits.max_prompt_tokens
    if len(ids) > limit:
        raise TooLarge(f"{len(ids)} prompt tokens exceed the limit of {limit}", field=f"{p}{field}")
    return ids


def check_sampling(s: SamplingParams, limit: int, field: str) -> SamplingParams:
    """Validate decoding parameters; returns them with floats normalised."""
    if not _is_int(s.max_new_tokens) or s.max_new_tokens < 1:
        raise InvalidArgument(f"must be an integer >= 1, got {s.max_new_tokens!r}", field=f"{field}.max_new_tokens")
    if s.max_new_tokens > limit:
        raise TooLarge(f"{s.max_new_tokens} new tokens exceed the limit of {limit}", field=f"{field}.max_new_tokens")
    temperature = require_finite(s.temperature, f"{field}.temperature")
    if temperature < 0:
        raise InvalidArgument("must be >= 0 (0 = greedy)", field=f"{field}.temperature")
    top_p = require_finite(s.top_p, f"{field}.top_p")
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"must be in (0, 1], got {s.top_p!r}", field=f"{field}.top_p")
    if not _is_int(s.top_k) or s.top_k < 0:
        raise InvalidArgument(f"must be an integer >= 0 (0 = off), got {s.top_k!r}", field=f"{field}.top_k")
    repetition = require_finite(s.repetition_penalty, f"{field}.repetition_penalty")
    if repetition <= 0:
        raise InvalidArgument("must be > 0 (1 = off)", field=f"{field}.repetition_penalty")
    frequency = require_finite(s.frequency_penalty, f"{field}.frequency_penalty")
    stop = tuple(s.stop)
    for n, text in enumerate(stop):
        if not isinstance(text, str) or not text:
            raise InvalidArgument("stop strings must be non-empty strings", field=f"{field}.stop[{n}]")
    check_seed(s.seed, f"{field}.seed")
    return replace(s, temperature=temperature, top_p=top_p, repetition_penalty=repetition, frequency_penalty=frequency, stop=stop)


def prepare_text(backend: "CausalLmBackend", request: TextRequest, field_prefix: str = "") -> PreparedText:
    """Validate a TextRequest for a causal LM: the engine's one prepared request (tokenised once)."""
    if request.image is not None:
        raise InvalidArgument("a causal LM takes no image", field=f"{field_prefix}image")
    ids = prompt_token_ids(backend, request.prompt, request.messages, "prompt", field_prefix)
    checked = check_text_request(backend, request, ids, field_prefix)
    return prepared_from(backend, checked, ids, field_prefix)


def prepared_from(backend: "CausalLmBackend", checked: TextRequest, ids: Sequence[int], field_prefix: str = "",
                  pixel_values: Any = None) -> PreparedText:
    """The PreparedText of a checked request: mitigation edits appended (steered row only), seed drawn,
    engine fit checked (every variant is one more row)."""
    plan = checked.plan
    if checked.mitigate_risk_top_n > 0:
        from sae_runtime.risk import mitigation_edits

        plan = replace(plan, edits=plan.edits + mitigation_edits(backend.risk_probe, checked.mitigate_risk_top_n))
    prepared = PreparedText(checked, tuple(ids), plan, new_generator(checked.sampling.seed)[1], pixel_values,
                            variant_plans=checked.variants)
    backend.engine.config.check_fits(prepared.n_sequences, prepared.reserved_tokens, f"{field_prefix}sampling.max_new_tokens")
    return prepared


def check_text_request(backend: "CausalLmBackend", request: TextRequest, ids: Sequence[int], field_prefix: str = "") -> TextRequest:
    """Validate a TextRequest whose prompt is ``ids``; returns it with the plan resolved (labels ->
    latent indices) and its sampling parameters normalised."""
    p = field_prefix
    sampling = check_sampling(request.sampling, backend.limits.max_new_tokens, f"{p}sampling")
    if backend.max_positions is not None and len(ids) + sampling.max_new_tokens > backend.max_positions:
        raise TooLarge(
            f"{len(ids)} prompt tokens + {sampling.max_new_tokens} new tokens exceed the model's {backend.max_positions} positions",
            field=f"{p}sampling.max_new_tokens",
        )
    mitigate = request.mitigate_risk_top_n
    if not _is_int(mitigate) or mitigate < 0:
        raise InvalidArgument(f"must be an integer >= 0, got {mitigate!r}", field=f"{p}mitigate_risk_top_n")
    if mitigate > 0 and backend.risk_probe is None:
        raise InvalidArgument(f"model {backend.name!r} has no risk probe", field=f"{p}mitigate_risk_top_n")
    if request.mitigation is not None:
        from sae_runtime.mitigation import check

        check(request.mitigation, backend.mitigation_resources)
    resources = backend.plan_resources
    plan = resources.resolve(request.plan, max_edits=max(backend.limits.max_edits - mitigate, 0), field_prefix=f"{p}plan")
    check_scope_applies(plan.scope, backend.kind, f"{p}plan.scope")
    if len(request.variants) > backend.limits.max_variants:
        raise TooLarge(f"{len(request.variants)} variants exceed the limit of {backend.limits.max_variants}", field=f"{p}variants")
    variants = []
    for n, variant in enumerate(request.variants):
        variants.append(resources.resolve(variant, field_prefix=f"{p}variants[{n}]"))
        check_scope_applies(variants[-1].scope, backend.kind, f"{p}variants[{n}].scope")
    if request.readout is not None:
        request.readout.check(backend.saes, field_prefix=f"{p}readout")
    if not _is_int(request.logprobs) or not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise InvalidArgument(f"must be an integer in [0, {MAX_LOGPROBS}], got {request.logprobs!r}", field=f"{p}logprobs")
    return replace(request, plan=plan, sampling=sampling, variants=tuple(variants))


def check_encode(backend: "CausalLmBackend", request: EncodeRequest, field_prefix: str = "") -> None:
    p = field_prefix
    if request.image is not None:
        raise InvalidArgument("a causal LM takes no image", field=f"{p}image")
    for n, name in enumerate(request.saes):
        if name not in backend.saes:
            raise NotFound(f"unknown SAE {name!r} (available: {', '.join(sorted(backend.saes)) or 'none'})", field=f"{p}saes[{n}]")
    if not _is_int(request.top_k) or not 0 < request.top_k <= 256:
        raise InvalidArgument("top_k must be in [1, 256]", field=f"{p}top_k")
    prompt_token_ids(backend, request.text, (), "text", p)


__all__ = ["MAX_LOGPROBS", "check_encode", "check_sampling", "check_text_request", "prepare_text", "prepared_from", "prompt_token_ids"]
