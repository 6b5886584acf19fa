"""Causal-LM backend: a HF causal LM with SAEs at hook sites, generating under per-request plans.

Usage::

    backend = CausalLmBackend.from_spec(ModelSpec(name="tiny", kind="causal_lm", path=dir, saes=...))
    prepared = backend.validate(TextRequest(prompt="the cat", plan=plan, sampling=SamplingParams(...)))
    [result] = backend.generate([prepared])         # or raw TextRequests: validated here
    for event in backend.stream(prepared): ...

Generation runs on the backend's :class:`~sae_runtime.engine.TextEngine`: requests are
continuously batched, each row steered by its own plan at the positions its scope names
(``prompt`` = prefill positions, ``generated`` = decode positions) and sampled with its own
generator, so a request's tokens do not depend on what shares its steps. ``include_default``
adds the unsteered twin of a request (no edits, same prompt, sampling parameters and seed) as
one more row. The model replica runs the engine's step loop on a thread
(``backend.engine.start()``); without it, ``generate`` and ``stream`` step it in the caller's thread.

Readouts (``request.readout``) give per prompt position and per generated token the top-k
latents of the named SAEs before/after the edits, and per sequence the pooled latents (see
:mod:`.lm_results`). With a risk probe, ``risk_prompt`` scores the prompt pools (the probe's
prompt head) and ``risk_final`` the prompt + generated pools (final head), both from the
after-edit latents; ``mitigate_risk_top_n`` appends ablations of the probe's N most
risk-positive latents to the plan (under the plan's scope).

Log-probs (``request.logprobs = n``) are those of :mod:`.sampling`: log_softmax of the logits
after repetition/frequency penalties and temperature (0 counted as 1), before top-k/top-p.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from sae_runtime.backends.completion import eos_ids_of
from sae_runtime.backends.lm_results import LabelIndex, pooled_latents, position_latents, risk_pools
from sae_runtime.backends.lm_validation import check_encode, prepare_text, prompt_token_ids
from sae_runtime.backends.plan_resources import PlanResources, build_plan_resources
from sae_runtime.backends.spec import EngineConfig, Limits, ModelSpec, VectorSpec
from sae_runtime.backends.steering_vectors import check_request as check_steering_vector_request
from sae_runtime.backends.steering_vectors import compute_steering_vector
from sae_runtime.backends.types import (
    Backend,
    EncodeRequest,
    EncodeResult,
    ImageRequest,
    ModelInfo,
    SaeInfo,
    SteeringVectorRequest,
    SteeringVectorResult,
    StreamEvent,
    TextRequest,
    TextResult,
)
from sae_runtime.engine import PreparedText, TextEngine
from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import InterventionPlan, ReadoutSpec
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext, check_widths


class CausalLmBackend(Backend):
    """A HF causal LM, its tokenizer, its SAEs (name -> Sae, ``cfg.hook_name`` set) and risk probe."""

    kind = "causal_lm"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        saes: Mapping[str, Sae],
        *,
        risk_probe: Any = None,
        name: str = "causal_lm",
        description: str = "",
        limits: Limits = Limits(),
        version: str = "",
        engine: EngineConfig = EngineConfig(),
        vectors: Sequence[VectorSpec] = (),
        presets: Sequence[tuple[str, InterventionPlan]] = (),
        label_indexes: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.saes = dict(saes)
        self.risk_probe = risk_probe
        self.name, self.description, self.limits, self.version = name, description, limits, version
        self.attached: dict[str, AttachedSae] = {}
        for sae_name, sae in self.saes.items():
            if not sae.cfg.hook_name:
                raise InvalidArgument(f"SAE {sae_name!r} names no hook site", field=f"saes.{sae_name}.hook_name")
            site = HookSite.parse(sae.cfg.hook_name, field=f"saes.{sae_name}.hook_name")
            if not site.is_text:
                raise InvalidArgument(f"site {site.name} is not a causal-LM site", field=f"saes.{sae_name}.hook_name")
            sae.eval().requires_grad_(False)
            self.attached[sae_name] = AttachedSae(sae_name, sae, site)
        check_widths(model, self.attached)
        if risk_probe is not None:
            for sae_name, d in risk_probe.layout.saes:
                if sae_name not in self.saes or self.saes[sae_name].d_sae != d:
                    raise InvalidArgument(f"the risk probe reads SAE {sae_name!r} with {d} latents, which this model lacks", field="risk_probe")
        self.labels = LabelIndex({n: s.labels for n, s in self.saes.items()})
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None)
        self.eos_ids = eos_ids_of(model.config, getattr(model, "generation_config", None), tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        if label_indexes is not None:
            self.label_indexes = dict(label_indexes)
        self.plan_resources = self._plan_resources(vectors, presets)
        self.engine = self._new_engine(engine)

    def _plan_resources(self, vectors: Sequence[VectorSpec], presets: Sequence[tuple[str, InterventionPlan]]) -> PlanResources:
        """Vectors loaded onto the model's device and dtype, presets validated, over every attached SAE."""
        param = next(self.model.parameters())
        return build_plan_resources(self.model, self.saes, {n: a.site for n, a in self.attached.items()}, limits=self.limits,
                                    vectors=vectors, presets=presets, describe=self.describe, device=param.device, dtype=param.dtype)

    @property
    def mitigation_resources(self):
        """What the risk probe offers per-request mitigation (sae_runtime.mitigation)."""
        return self.engine.mitigation_resources

    def _new_engine(self, config: EngineConfig, plugin: Any = None, vision_saes: Sequence[str] = ()) -> TextEngine:
        return TextEngine(self.model, self.tokenizer, self.attached, eos_ids=self.eos_ids, pad_id=self.pad_id,
                          vocab_size=self.vocab_size, labels=self.labels, risk_probe=self.risk_probe, config=config,
                          plugin=plugin, vision_saes=vision_saes)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "CausalLmBackend":
        """Load model and tokenizer (``from_pretrained``: a local directory or a hub id), the SAEs
        and the risk probe ``spec`` names. FormatError names the path that failed to load."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sae_runtime.errors import FormatError
        from sae_runtime.backends.loading import load_spec_saes
        from sae_runtime.search import build_label_indexes

        dtype = getattr(torch, spec.dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec.path)
        except OSError as err:
            raise FormatError(f"cannot load a causal LM and tokenizer: {err}", field=spec.path) from None
        model = model.to(spec.device).eval()
        saes, load_timings = load_spec_saes(spec, model)
        probe = None
        if spec.risk_probe:
            from sae_runtime.risk import RiskProbe

            probe = RiskProbe.load(spec.risk_probe)
        backend = cls(model, tokenizer, saes, risk_probe=probe, name=spec.name, description=spec.description,
                      limits=spec.limits, engine=spec.engine, vectors=spec.vectors, presets=spec.presets,
                      label_indexes=build_label_indexes(saes))  # label embeddings, once per SAE
        backend.load_timings = load_timings
        return backend

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            kind=self.kind,
            description=self.description,
            saes=tuple(
                SaeInfo(name=n, hook_name=self.attached[n].site.name, architecture=s.cfg.architecture, d_in=s.d_in,
                        d_sae=s.d_sae, has_labels=bool(s.labels), version=self.version)
                for n, s in self.saes.items()
            ),
            has_risk_probe=self.risk_probe is not None,
            version=self.version,
            presets=tuple(self.plan_resources.presets),
            vectors=tuple((n, v.site.name) for n, v in self.plan_resources.vectors.items()),
        )

    def compute_steering_vector(self, request: SteeringVectorRequest) -> SteeringVectorResult:
        """DiffMean between two prompt sets at a language-model site (see :mod:`.steering_vectors`);
        validated here, computed on the engine thread between steps."""
        check_steering_vector_request(self, request)
        return self.engine.call(lambda: compute_steering_vector(self, request)).result()

    # -- validation --------------------------------------------------------------------------
    def validate(self, request: TextRequest | ImageRequest | EncodeRequest, field_prefix: str = "") -> PreparedText | EncodeRequest:
        """Check a request against the model's limits, SAEs and tokenizer, once: a text request
        comes back as the engine's PreparedText (token ids, plan with labels resolved, seed).
        Errors name the field (``sampling.top_p``, ``plan.edits[0].latents``)."""
        if isinstance(request, EncodeRequest):
            check_encode(self, request, field_prefix)
            return request
        if not isinstance(request, TextRequest):
            raise InvalidArgument(f"{self.kind} generates text, got a {type(request).__name__}", field=field_prefix.rstrip(".") or None)
        return prepare_text(self, request, field_prefix)

    def prepare(self, requests: Sequence[TextRequest | PreparedText]) -> list[PreparedText]:
        """Prepared requests, validating those not prepared yet (errors name ``requests[i]`` in a batch)."""
        many = len(requests) > 1
        return [r if isinstance(r, PreparedText) else self.validate(r, f"requests[{i}]." if many else "")  # type: ignore[misc]
                for i, r in enumerate(requests)]

    # -- generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[TextRequest | PreparedText]) -> list[TextResult]:
        """Results for ``requests``, in order. Every request is validated before anything runs, so
        an error names its request (``requests[2].sampling.top_p``). All are submitted at once
        and share engine steps; rows are isolated, so how they are batched changes no result."""
        return self.engine.generate(self.prepare(requests)) if requests else []

    def stream(self, request: TextRequest | PreparedText) -> Iterator[StreamEvent]:
        """One StreamEvent per generated token of the steered row (with the running risk when the
        model has a probe), then a final event whose ``result`` equals ``generate([request])[0]``
        (a token's latents and risk are attached once the token itself has run through the model,
        i.e. one step after it was sampled)."""
        return self.engine.stream(self.prepare([request])[0])

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, request: EncodeRequest) -> EncodeResult:
        """Top latents of ``request.saes`` at every position of ``request.text`` (no generation), the
        pooled latents, and the probe's prompt-head risk when the model has a probe. Runs on the
        engine thread between steps (the engine's hooks share the model's modules)."""
        check_encode(self, request)
        return self.engine.call(lambda: self._encode(request)).result()

    def _encode(self, request: EncodeRequest) -> EncodeResult:
        ids = prompt_token_ids(self, request.text, (), "text")
        names = list(request.saes)
        probe_saes = [n for n, _ in self.risk_probe.layout.saes] if self.risk_probe is not None else []
        read = list(dict.fromkeys(names + probe_saes))
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad():
            if read:
                ctx = SteeringContext(self.model, self.attached, [None], ReadoutSpec(tuple(read), max(request.top_k, 1)))
                with ctx:
                    ctx.prefill()
                    self.model(input_ids=input_ids)
                readout = ctx.readouts()[0]
            else:
                readout = {}
        positions = position_latents(readout, "prefill", names, request.top_k, self.labels) if names else [() for _ in ids]
        risk = None
        if self.risk_probe is not None:
            d_sae = {n: self.saes[n].d_sae for n in probe_saes}
            risk = self.risk_probe.score_prompt(risk_pools(readout, probe_saes, d_sae, with_generated=False))
        return EncodeResult(
            tokens=tuple(self.tokenizer.decode([i]) for i in ids),
            latents=tuple(positions),
            pooled=pooled_latents(readout, names, request.top_k, self.labels),
            risk=risk,
        )


__all__ = ["CausalLmBackend"]
