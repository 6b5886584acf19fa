"""proto <-> sae_runtime: the one module that knows both the wire messages and the library specs.

Requests go proto -> ``TextRequest`` / ``ImageRequest`` / ``EncodeRequest`` (structural checks
only: enums and mask shape; everything else is validated by ``Backend.validate``), results go
``TextResult`` / ``ImageResult`` / ``EncodeResult`` -> proto. Field names in errors are the
proto's: :func:`proto_field` renames the library's dataclass fields (``sampling.top_p`` ->
``params.top_p``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch
from steering.v1 import steering_pb2 as pb

from sae_runtime.backends import types as rt
from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import CfgHalf, EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, TokenScope, VisionScope

DEFAULT_TOP_K = 5

_OPS = {
    pb.EDIT_OP_SET: EditOp.SET,
    pb.EDIT_OP_ABLATE: EditOp.ABLATE,
    pb.EDIT_OP_SCALE: EditOp.SCALE,
    pb.EDIT_OP_ADD: EditOp.ADD,
    pb.EDIT_OP_CAP: EditOp.CAP,
}
_TOKEN_SCOPES = {pb.TOKEN_SCOPE_ALL: TokenScope.ALL, pb.TOKEN_SCOPE_PROMPT: TokenScope.PROMPT, pb.TOKEN_SCOPE_GENERATED: TokenScope.GENERATED}
_VISION_SCOPES = {pb.VISION_SCOPE_ALL: VisionScope.ALL, pb.VISION_SCOPE_CLS: VisionScope.CLS}
_CFG_HALVES = {pb.CFG_HALF_BOTH: CfgHalf.BOTH, pb.CFG_HALF_COND: CfgHalf.COND, pb.CFG_HALF_UNCOND: CfgHalf.UNCOND}

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


def _enum(table: dict, value: int, field: str):
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown or unspecified value {value}", field=field) from None


def _mask(msg: pb.Mask, field: str) -> torch.Tensor | None:
    if not msg.height and not msg.width and not msg.values:
        return None
    if msg.height * msg.width != len(msg.values) or msg.height == 0:
        raise InvalidArgument(
            f"needs height * width values ({msg.height} * {msg.width}), got {len(msg.values)}", field=field
        )
    return torch.tensor(list(msg.values), dtype=torch.float32).reshape(msg.height, msg.width)


def plan_from_proto(msg: pb.InterventionPlan, field: str = "plan") -> InterventionPlan:
    edits = []
    for n, e in enumerate(msg.edits):
        f = f"{field}.edits[{n}]"
        edits.append(
            LatentEdit(
                sae=e.sae,
                op=_enum(_OPS, e.op, f"{f}.op"),
                latents=tuple(int(i) for i in e.latents),
                labels=tuple(e.labels),
                value=float(e.value),
                normalize=e.normalize,
            )
        )
    s = msg.scope
    scope = Scope(
        tokens=_enum(_TOKEN_SCOPES, s.tokens, f"{field}.scope.tokens"),
        vision=_enum(_VISION_SCOPES, s.vision, f"{field}.scope.vision"),
        mask=_mask(s.mask, f"{field}.scope.mask") if s.HasField("mask") else None,
        step_start=s.step_start,
        step_end=s.step_end if s.HasField("step_end") else None,
        cfg_half=_enum(_CFG_HALVES, s.cfg_half, f"{field}.scope.cfg_half"),
    )
    preserve = msg.preserve_error if msg.HasField("preserve_error") else True
    return InterventionPlan(edits=tuple(edits), scope=scope, preserve_error=preserve)


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
    msg: pb.GenerateRequest | pb.GenerateMultimodalRequest, all_saes: Sequence[str], max_new_tokens_limit: int | None = None
) -> rt.TextRequest:
    """A GenerateRequest (or GenerateMultimodalRequest, which adds ``image``) as a TextRequest."""
    image = bytes(msg.image) if isinstance(msg, pb.GenerateMultimodalRequest) else None
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
    return pb.Completion(text=c.text, tokens=[token_to_proto(t) for t in c.tokens], finish_reason=c.finish_reason)


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
    )
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
