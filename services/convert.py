"""proto <-> sae_runtime: the one module that knows both the wire messages and the library specs.

Requests go proto -> ``TextRequest`` / ``ImageRequest`` / ``EncodeRequest`` /
``SteeringVectorRequest`` (structural checks only: enums, mask shape, condition trees, variant
and inline-vector counts; everything else is validated by ``Backend.validate``), results go
``TextResult`` / ``ImageResult`` / ``EncodeResult`` / ``SteeringVectorResult`` -> proto. Plans
(edits, conditions, vectors, presets) convert both ways in :mod:`services.convert_plan`. Field names in errors are the
proto's: :func:`proto_field` renames the library's dataclass fields (``sampling.top_p`` ->
``params.top_p``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from steering.v1 import steering_pb2 as pb

from sae_runtime.backends import types as rt
from sae_runtime.backends.feature_search import FeatureMatch
from sae_runtime.backends.spec import Limits
from sae_runtime.errors import InvalidArgument, NotFound, TooLarge
from sae_runtime.plan import ReadoutSpec
from services.convert_plan import check_plan_limits, plan_from_proto, plan_to_proto  # noqa: F401 - plan_* are this module's API too

DEFAULT_TOP_K = 5
#: ComputeSteeringVector's default and largest top_n.
DEFAULT_VECTOR_TOP_N = 5
MAX_VECTOR_TOP_N = 256

#: Library field name (prefix) -> proto field name, longest first.
_FIELD_RENAMES = (
    ("sampling.seed", "seed"),
    ("sampling", "params"),
    ("readout", "return_latents"),
    ("logprobs", "return_logprobs"),
)


def proto_field(field: str | None) -> str | None:
    """The proto name of a library request field: ``sampling.max_new_tokens`` -> ``params.max_new_tokens``."""
    if not field:
        return field
    for lib, wire in _FIELD_RENAMES:
        if field == lib or re.match(rf"^{re.escape(lib)}[.\[]", field):
            return wire + field[len(lib) :]
    return field


# -- requests -----------------------------------------------------------------------------------


def readout_from_proto(msg: pb.LatentReadout, all_saes: Sequence[str]) -> ReadoutSpec:
    return ReadoutSpec(saes=tuple(msg.saes) or tuple(all_saes), top_k=msg.top_k or DEFAULT_TOP_K)


def sampling_from_proto(params: pb.GenerationParams, seed: int | None, max_new_tokens_limit: int | None = None) -> rt.SamplingParams:
    """Unset ``max_new_tokens`` is the library default, capped at the model's limit."""
    d = rt.SamplingParams()
    default_new = d.max_new_tokens if max_new_tokens_limit is None else min(d.max_new_tokens, max_new_tokens_limit)
    return rt.SamplingParams(
        max_new_tokens=params.max_new_tokens if params.HasField("max_new_tokens") else default_new,
        temperature=params.temperature,
        top_p=params.top_p if params.HasField("top_p") else d.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else d.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=tuple(params.stop),
        seed=seed,
    )


def text_request_from_proto(
    msg: pb.GenerateRequest | pb.GenerateMultimodalRequest,
    all_saes: Sequence[str],
    max_new_tokens_limit: int | None = None,
    limits: Limits | None = None,
) -> rt.TextRequest:
    """A GenerateRequest (or GenerateMultimodalRequest, which adds ``image``) as a TextRequest.
    With ``limits``: TooLarge for too many variants or inline vector floats (checked before the
    plans are converted)."""
    image = bytes(msg.image) if isinstance(msg, pb.GenerateMultimodalRequest) else None
    if limits is not None:
        check_plan_limits([("plan", msg.plan), *((f"variants[{n}]", v) for n, v in enumerate(msg.variants))], limits)
    return rt.TextRequest(
        prompt=msg.prompt,
        messages=tuple(rt.ChatMessage(role=m.role, content=m.content) for m in msg.messages),
        image=image,
        plan=plan_from_proto(msg.plan),
        sampling=sampling_from_proto(msg.params, msg.seed if msg.HasField("seed") else None, max_new_tokens_limit),
        readout=readout_from_proto(msg.return_latents, all_saes) if msg.HasField("return_latents") else None,
        include_default=msg.include_default,
        logprobs=msg.return_logprobs,
        mitigate_risk_top_n=msg.mitigate_risk_top_n,
        mitigation=mitigation_from_proto(msg.mitigation) if msg.HasField("mitigation") else None,
        variants=tuple(plan_from_proto(v, f"variants[{n}]") for n, v in enumerate(msg.variants)),
    )


def mitigation_from_proto(msg: pb.Mitigation) -> Any:
    """A validated MitigationSpec (InvalidArgument names ``mitigation.<field>``)."""
    from sae_runtime.mitigation import MitigationSpec

    params = {name: getattr(msg, name) for name in ("text", "scale", "top_n") if msg.HasField(name)}
    return MitigationSpec.parse(msg.mode or "none", msg.threshold, params)


def image_request_from_proto(msg: pb.GenerateImageRequest, all_saes: Sequence[str]) -> rt.ImageRequest:
    return rt.ImageRequest(
        prompt=msg.prompt,
        negative_prompt=msg.negative_prompt,
        num_inference_steps=msg.num_inference_steps if msg.HasField("num_inference_steps") else 1,
        guidance_scale=msg.guidance_scale,
        height=msg.height or None,
        width=msg.width or None,
        seed=msg.seed if msg.HasField("seed") else None,
        plan=plan_from_proto(msg.plan),
        readout=readout_from_proto(msg.return_latents, all_saes) if msg.HasField("return_latents") else None,
        include_default=msg.include_default,
    )


def encode_request_from_proto(msg: pb.EncodeRequest, all_saes: Sequence[str]) -> rt.EncodeRequest:
    return rt.EncodeRequest(
        text=msg.text,
        image=bytes(msg.image) if msg.image else None,
        saes=tuple(msg.saes) or tuple(all_saes),
        top_k=msg.top_k or DEFAULT_TOP_K,
    )


def is_steered(request: rt.TextRequest | rt.ImageRequest) -> bool:
    """The request's own plan edits something (variants do not count: ``steered`` is about
    ``completion``), or it asks for risk mitigation."""
    return not request.plan.is_empty or bool(getattr(request, "mitigate_risk_top_n", 0)) or bool(getattr(request, "mitigation", None))


# -- results ------------------------------------------------------------------------------------


def _activations(acts: Iterable[rt.LatentActivation]) -> list[pb.LatentActivation]:
    return [pb.LatentActivation(index=a.index, value=a.value, label=a.label or "") for a in acts]


def _sae_latents(items: Iterable[rt.PositionLatents]) -> list[pb.SaeLatents]:
    return [pb.SaeLatents(sae=p.sae, before=_activations(p.before), after=_activations(p.after)) for p in items]


def _positions(per_position: Sequence[Sequence[rt.PositionLatents]], tokens: Sequence[str] = ()) -> list[pb.PositionLatents]:
    return [
        pb.PositionLatents(position=n, token=tokens[n] if n < len(tokens) else "", saes=_sae_latents(saes))
        for n, saes in enumerate(per_position)
    ]


def _pooled(items: Iterable[rt.PooledLatents]) -> list[pb.PooledLatents]:
    return [pb.PooledLatents(sae=p.sae, top_mean=_activations(p.top_mean), top_max=_activations(p.top_max)) for p in items]


def risk_to_proto(risk: rt.RiskScore | None) -> pb.Risk | None:
    if risk is None:
        return None
    return pb.Risk(
        score=risk.probability,
        top_concepts=[
            pb.RiskContribution(sae=c.sae, latent=c.latent, label=c.label or "", contribution=c.contribution)
            for c in risk.contributions
        ],
    )


def token_to_proto(t: rt.GeneratedToken) -> pb.Token:
    msg = pb.Token(
        id=t.id,
        text=t.text,
        top_logprobs=[pb.TokenLogprob(token=s, logprob=lp) for s, lp in t.top_logprobs],
        latents=_sae_latents(t.latents),
    )
    if t.logprob is not None:
        msg.logprob = t.logprob
    return msg


def completion_to_proto(c: rt.Completion) -> pb.Completion:
    msg = pb.Completion(text=c.text, tokens=[token_to_proto(t) for t in c.tokens], finish_reason=c.finish_reason)
    hit = c.stopped_by
    if hit is not None:
        msg.stopped_by.CopyFrom(pb.ConditionHit(position=hit.position, sae=hit.sae, latent=hit.latent, value=hit.value))
    return msg


def variant_to_proto(v: rt.VariantResult) -> pb.VariantCompletion:
    msg = pb.VariantCompletion(completion=completion_to_proto(v.completion))
    if v.risk_final is not None:
        msg.risk.CopyFrom(risk_to_proto(v.risk_final))
    if v.plan is not None:
        msg.plan.CopyFrom(plan_to_proto(v.plan))
    return msg


def versions_of(info: rt.ModelInfo, risk_probe: str | None) -> pb.Versions:
    return pb.Versions(
        model=info.name,
        model_version=info.version,
        saes={s.name: s.version for s in info.saes},
        risk_probe=risk_probe or "",
    )


def text_result_to_proto(
    result: rt.TextResult, *, timings: pb.Timings, versions: pb.Versions, steered: bool
) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        completion=completion_to_proto(result.steered),
        prompt_latents=_positions(result.prompt_latents),
        pooled=_pooled(result.pooled),
        timings=timings,
        versions=versions,
        steered=steered,
        vision_latents=_positions(result.vision_latents),
        mitigation=result.mitigation,
        variants=[variant_to_proto(v) for v in result.variants],
    )
    if result.plan is not None:
        msg.plan.CopyFrom(plan_to_proto(result.plan))
    if result.default is not None:
        msg.default_completion.CopyFrom(completion_to_proto(result.default))
    if result.risk_prompt is not None:
        msg.risk_prompt.CopyFrom(risk_to_proto(result.risk_prompt))
    if result.risk_final is not None:
        msg.risk.CopyFrom(risk_to_proto(result.risk_final))
    return msg


def image_result_to_proto(
    result: rt.ImageResult, *, timings: pb.Timings, versions: pb.Versions, steered: bool
) -> pb.GenerateImageResponse:
    maps = []
    for m in result.latent_maps:
        h = len(m.values)
        w = len(m.values[0]) if h else 0
        maps.append(
            pb.LatentMap(
                sae=m.sae,
                latent=m.latent,
                label=m.label or "",
                mean=m.mean,
                heatmap_png=m.heatmap_png,
                height=h,
                width=w,
                values=[v for row in m.values for v in row],
            )
        )
    return pb.GenerateImageResponse(
        png=result.png,
        default_png=result.default_png or b"",
        latent_maps=maps,
        timings=timings,
        versions=versions,
        steered=steered,
    )


def encode_result_to_proto(result: rt.EncodeResult, *, timings: pb.Timings, versions: pb.Versions) -> pb.EncodeResponse:
    msg = pb.EncodeResponse(
        tokens=list(result.tokens),
        latents=_positions(result.latents, result.tokens),
        pooled=_pooled(result.pooled),
        timings=timings,
        versions=versions,
        vision_latents=_positions(result.vision_latents),
    )
    if result.risk is not None:
        msg.risk.CopyFrom(risk_to_proto(result.risk))
    return msg


def model_info_to_proto(info: rt.ModelInfo, versions: pb.Versions | None = None) -> pb.ModelInfo:
    """ListModels' entry; ``versions`` (what responses carry) fills the model and SAE versions, so
    both report the same strings."""
    msg = pb.ModelInfo(
        name=info.name,
        kind=info.kind,
        description=info.description,
        saes=[
            pb.SaeInfo(
                name=s.name,
                hook_name=s.hook_name,
                architecture=s.architecture,
                d_in=s.d_in,
                width=s.d_sae,
                has_labels=s.has_labels,
                version=s.version,
            )
            for s in info.saes
        ],
        has_risk_probe=info.has_risk_probe,
        version=info.version,
        presets=list(info.presets),
        vectors=[pb.SteeringVectorInfo(name=name, site=str(site)) for name, site in info.vectors],
    )
    if versions is not None:
        msg.version = versions.model_version
        for sae in msg.saes:
            sae.version = versions.saes.get(sae.name, sae.version)
    return msg


def evaluate_sae_request_from_proto(msg: pb.EvaluateSaeRequest) -> tuple[str, tuple[str, ...], bool]:
    """(SAE name, texts, with loss recovered) of an EvaluateSae request."""
    if not msg.sae:
        raise InvalidArgument("name the SAE to evaluate", field="sae")
    return msg.sae, tuple(msg.texts), not msg.skip_loss


def evaluate_sae_result_to_proto(m: Any, *, timings: pb.Timings, versions: pb.Versions) -> pb.EvaluateSaeResponse:
    """An EvaluateSaeResponse from ``sae_runtime.metrics.ReconstructionMetrics``."""
    msg = pb.EvaluateSaeResponse(l0=m.l0, fvu=m.fvu, dead_share=m.dead_share, dense_share=m.dense_share, n_tokens=m.n_tokens,
                                 timings=timings, versions=versions)  # fmt: skip
    if m.loss_recovered is not None:
        msg.loss_recovered, msg.loss_clean = m.loss_recovered, m.loss_clean
        msg.loss_with_sae, msg.loss_zero_ablated = m.loss_with_dict, m.loss_zero_ablated
    return msg


def feature_to_proto(f: FeatureMatch) -> pb.Feature:
    """A SearchFeatures hit; ``score`` is the semantic search's cosine (1 for a label-substring match)."""
    return pb.Feature(sae=f.sae, index=f.index, label=f.label, score=float(f.score))


def search_options_from_proto(msg: pb.SearchFeaturesRequest) -> dict[str, Any]:
    """Keyword arguments of ``search_features`` beyond query, sae, index and limit: ``semantic``
    only when the request sets it (unset = the library's default)."""
    return {"semantic": msg.semantic} if msg.HasField("semantic") else {}


def _prompt_set(prompts: Sequence[str], field: str, limit: int) -> tuple[str, ...]:
    if not prompts:
        raise InvalidArgument("needs at least one prompt", field=field)
    if len(prompts) > limit:
        raise TooLarge(f"{len(prompts)} prompts exceed the limit of {limit}", field=field)
    for n, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise InvalidArgument("a prompt is a non-empty string", field=f"{field}[{n}]")
    return tuple(prompts)


def steering_vector_request_from_proto(
    msg: pb.ComputeSteeringVectorRequest, limits: Limits, sae_sites: dict[str, str]
) -> rt.SteeringVectorRequest:
    """A SteeringVectorRequest: both prompt sets non-empty, at most ``limits.max_vector_prompts``
    non-empty strings each; an empty ``site`` is the hook site of ``sae`` (``sae_sites``: SAE name
    -> hook name). NotFound names ``sae``; the backend checks the site and the prompts' lengths."""
    positive = _prompt_set(list(msg.positive), "positive", limits.max_vector_prompts)
    negative = _prompt_set(list(msg.negative), "negative", limits.max_vector_prompts)
    if msg.sae and msg.sae not in sae_sites:
        raise NotFound(f"unknown SAE {msg.sae!r} (available: {', '.join(sorted(sae_sites)) or 'none'})", field="sae")
    site = msg.site or (sae_sites[msg.sae] if msg.sae else "")
    if not site:
        raise InvalidArgument("name the hook site (or an SAE, whose site is used)", field="site")
    if not 0 <= msg.top_n <= MAX_VECTOR_TOP_N:
        raise InvalidArgument(f"must be in [0, {MAX_VECTOR_TOP_N}] (0 = {DEFAULT_VECTOR_TOP_N})", field="top_n")
    return rt.SteeringVectorRequest(positive=positive, negative=negative, site=site, sae=msg.sae,
                                    top_n=msg.top_n or DEFAULT_VECTOR_TOP_N)  # fmt: skip


def steering_vector_result_to_proto(
    result: rt.SteeringVectorResult, *, timings: pb.Timings, versions: pb.Versions
) -> pb.ComputeSteeringVectorResponse:
    """The response; the direction tensor is read out as floats (no math)."""
    direction = result.direction
    values = direction.detach().reshape(-1).tolist() if hasattr(direction, "detach") else [float(x) for x in direction]
    return pb.ComputeSteeringVectorResponse(
        site=str(result.site),
        values=values,
        n_positive_tokens=result.n_positive_tokens,
        n_negative_tokens=result.n_negative_tokens,
        sae=result.sae,
        closest=[pb.DecoderMatch(latent=int(i), label=label or "", cosine=float(cos)) for i, label, cos in result.closest],
        timings=timings,
        versions=versions,
    )
