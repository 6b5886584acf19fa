"""LLaVA backend: LlavaForConditionalGeneration (llava-hf layout) with SAEs on vision-encoder and
language-model layers, generating under per-request plans.

It is the causal-LM backend on the same text engine (:mod:`sae_runtime.engine`), with the image
as a modality plug-in: a row's image is run through the vision tower and projector when the row
is admitted (vision-SAE edits applied per row, by slot), and its features enter that row's
prefill (``mm_encoder_outputs``); text and image rows share the running batch. Plus:

- images arrive as PNG/JPEG bytes (``TextRequest.image``), decoded with Pillow
  (:func:`.images.decode_image`: malformed bytes are InvalidArgument on ``image``, oversized ones
  TooLarge) and turned into ``pixel_values`` by the model's processor (AutoProcessor), which also
  expands the prompt's image token into one token per image feature. A prompt that names no
  image token gets one in front (``<image>\\n``); chat messages get an image entry in the first
  user message;
- vision SAEs (sites ``vision.layers.L``: the output of CLIP encoder layer L, all tokens with CLS
  at position 0; LLaVA-1.5 feeds ``hidden_states[-2]`` = layer ``n_layers - 2`` to its projector)
  are edited in the prefill forward, on every vision position or on CLS only (``scope.vision``);
  language-model SAEs follow the token scopes of the causal LM (``prompt`` = the prefill
  positions, which include the image-token positions the projector fills);
- readouts of vision SAEs come back per vision position in ``TextResult.vision_latents`` and
  pooled over the vision positions in ``pooled``; a risk probe reading a vision SAE sees those
  pools as its prompt pools.

``max_prompt_tokens`` counts the text tokens of a prompt, not the image tokens the processor adds
(576 for LLaVA-1.5), which are bounded by the image processor instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from sae_runtime.backends.causal_lm import CausalLmBackend
from sae_runtime.backends.images import decode_image
from sae_runtime.backends.lm_results import LabelIndex, pooled_latents, position_latents, risk_pools
from sae_runtime.backends.lm_validation import check_encode, check_text_request, prepared_from
from sae_runtime.backends.spec import EngineConfig, Limits, ModelSpec, VectorSpec
from sae_runtime.backends.types import EncodeRequest, EncodeResult, ImageRequest, TextRequest
from sae_runtime.engine import PreparedText
from sae_runtime.engine.plans import PlanTable
from sae_runtime.engine.request import SequenceRun
from sae_runtime.errors import InvalidArgument, TooLarge
from sae_runtime.plan import InterventionPlan, ReadoutSpec
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite, SiteKind
from sae_runtime.steering import AttachedSae, SteeringContext, check_widths


class LlavaBackend(CausalLmBackend):
    """A LlavaForConditionalGeneration, its processor, SAEs (name -> Sae with ``cfg.hook_name``) and risk probe."""

    kind = "llava"

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        saes: Mapping[str, Sae],
        *,
        risk_probe: Any = None,
        name: str = "llava",
        description: str = "",
        limits: Limits = Limits(),
        version: str = "",
        engine: EngineConfig = EngineConfig(),
        vectors: Sequence[VectorSpec] = (),
        presets: Sequence[tuple[str, InterventionPlan]] = (),
        label_indexes: Mapping[str, Any] | None = None,
    ) -> None:
        sites: dict[str, HookSite] = {}
        for sae_name, sae in saes.items():
            if not sae.cfg.hook_name:
                raise InvalidArgument(f"SAE {sae_name!r} names no hook site", field=f"saes.{sae_name}.hook_name")
            site = HookSite.parse(sae.cfg.hook_name, field=f"saes.{sae_name}.hook_name")
            if not (site.is_text or site.kind is SiteKind.VISION_LAYER):
                raise InvalidArgument(f"site {site.name} is neither a language-model nor a vision-encoder site", field=f"saes.{sae_name}.hook_name")
            sites[sae_name] = site
        text = {n: s for n, s in saes.items() if sites[n].is_text}
        super().__init__(model, processor.tokenizer, text, risk_probe=None, name=name, description=description, limits=limits,
                         version=version, label_indexes=label_indexes)
        self.processor = processor
        self.saes = dict(saes)
        self.vision_saes = tuple(n for n in saes if not sites[n].is_text)
        for sae_name in self.vision_saes:
            self.saes[sae_name].eval().requires_grad_(False)
            self.attached[sae_name] = AttachedSae(sae_name, self.saes[sae_name], sites[sae_name])
        check_widths(model, {n: self.attached[n] for n in self.vision_saes})
        if risk_probe is not None:
            for sae_name, d in risk_probe.layout.saes:
                if sae_name not in self.saes or self.saes[sae_name].d_sae != d:
                    raise InvalidArgument(f"the risk probe reads SAE {sae_name!r} with {d} latents, which this model lacks", field="risk_probe")
        self.risk_probe = risk_probe
        self.labels = LabelIndex({n: s.labels for n, s in self.saes.items()})
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.plan_resources = self._plan_resources(vectors, presets)
        self.engine = self._new_engine(engine, _VisionPlugin(model), self.vision_saes)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "LlavaBackend":
        """Load model and processor (``from_pretrained``: a local directory or a hub id), SAEs and probe."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from sae_runtime.errors import FormatError
        from sae_runtime.backends.loading import load_spec_saes
        from sae_runtime.search import build_label_indexes

        try:
            model = LlavaForConditionalGeneration.from_pretrained(spec.path, dtype=getattr(torch, spec.dtype))
            processor = AutoProcessor.from_pretrained(spec.path)
        except OSError as err:
            raise FormatError(f"cannot load a LLaVA model and processor: {err}", field=spec.path) from None
        saes, load_timings = load_spec_saes(spec, model)
        probe = None
        if spec.risk_probe:
            from sae_runtime.risk import RiskProbe

            probe = RiskProbe.load(spec.risk_probe)
        backend = cls(model.to(spec.device).eval(), processor, saes, risk_probe=probe, name=spec.name,
                      description=spec.description, limits=spec.limits, engine=spec.engine, vectors=spec.vectors,
                      presets=spec.presets,
                      label_indexes=build_label_indexes(saes))  # label embeddings, once per SAE
        backend.load_timings = load_timings
        return backend

    # -- validation --------------------------------------------------------------------------
    def validate(self, request: TextRequest | ImageRequest | EncodeRequest, field_prefix: str = "") -> PreparedText | EncodeRequest:
        """As the causal LM, plus the image: decoded and run through the processor once, here, so
        bad bytes fail before the engine and the engine gets the pixel values."""
        p = field_prefix
        if isinstance(request, EncodeRequest):
            check_encode(self, replace(request, image=None, text=request.text or " "), p)
            if request.image is not None:
                self._decode(request.image, f"{p}image")
            elif not request.text:
                raise InvalidArgument("give text, an image or both", field=f"{p}text")
            self._check_image_tokens([request.text], request.image is not None, p, text_field="text")
            return request
        if not isinstance(request, TextRequest):
            raise InvalidArgument(f"llava generates text, got a {type(request).__name__}", field=p.rstrip(".") or None)
        if request.messages:
            if request.prompt:
                raise InvalidArgument("give either prompt or messages, not both", field=f"{p}messages")
            for n, m in enumerate(request.messages):
                if not isinstance(m.role, str) or not m.role:
                    raise InvalidArgument("role must be a non-empty string", field=f"{p}messages[{n}].role")
                if not isinstance(m.content, str):
                    raise InvalidArgument("content must be a string", field=f"{p}messages[{n}].content")
        elif not isinstance(request.prompt, str) or not request.prompt:
            raise InvalidArgument("empty prompt (give prompt or messages)", field=f"{p}prompt")
        self._check_image_tokens([request.prompt] + [m.content for m in request.messages], request.image is not None, p)
        text_field = f"{p}messages" if request.messages else f"{p}prompt"
        ids, pixels = self.prompt_inputs(request, f"{p}image")
        n_text = sum(1 for i in ids if i != self.image_token_id)
        if n_text > self.limits.max_prompt_tokens:
            raise TooLarge(f"{n_text} prompt tokens exceed the limit of {self.limits.max_prompt_tokens}", field=text_field)
        checked = check_text_request(self, replace(request, image=None), ids, p)
        return prepared_from(self, replace(checked, image=request.image), ids, p, pixels)

    def _check_image_tokens(self, texts: list[str], has_image: bool, p: str, text_field: str = "prompt") -> None:
        """One image per request: the text may hold at most one image token, and only with an image."""
        n = sum(t.count(self.image_token) for t in texts)
        if n and not has_image:
            raise InvalidArgument(f"the {text_field} has an image token {self.image_token!r} but no image was given", field=f"{p}image")
        if n > 1:
            raise InvalidArgument(f"one image per request: the {text_field} has several {self.image_token!r} tokens", field=f"{p}{text_field}")

    def _decode(self, data: bytes, field: str):
        return decode_image(data, field=field, max_bytes=self.limits.max_image_bytes, max_side=self.limits.max_image_side)

    # -- prompts -----------------------------------------------------------------------------
    def prompt_text(self, request: TextRequest) -> tuple[str, bool]:
        """(prompt text with the image token where the image goes, whether to add special tokens)."""
        has_image = request.image is not None
        if not request.messages:
            text = request.prompt
            if has_image and self.image_token not in text:
                text = f"{self.image_token}\n{text}"
            return text, True
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if has_image and not any(self.image_token in m.content for m in request.messages):
            first = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
            # llava-hf templates read structured content; plain templates print it, so fall back.
            structured = [
                {**m, "content": ([{"type": "image"}] if i == first else []) + [{"type": "text", "text": m["content"]}]}
                for i, m in enumerate(messages)
            ]
            text = self.processor.apply_chat_template(structured, add_generation_prompt=True, tokenize=False)
            if "'type'" not in text and self.image_token in text and all(m["content"] in text for m in messages):
                return text, False
            messages[first] = {**messages[first], "content": f"{self.image_token}\n{messages[first]['content']}"}
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False

    def prompt_inputs(self, request: TextRequest, field: str = "image") -> tuple[list[int], Tensor | None]:
        """Token ids of the prompt (image tokens expanded) and pixel_values (1, 3, H, W) or None."""
        text, special = self.prompt_text(request)
        if request.image is None:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"]), None
        image = self._decode(request.image, field)
        enc = self.processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=special)
        dtype = next(self.model.parameters()).dtype
        return enc["input_ids"][0].tolist(), enc["pixel_values"].to(dtype)

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, request: EncodeRequest) -> EncodeResult:
        """Latents of ``request.saes`` for a text and/or image without generating: text SAEs per
        prompt token (image tokens included), vision SAEs per vision position in ``vision_latents``."""
        self.validate(request)
        return self.engine.call(lambda: self._encode_checked(request)).result()

    def _encode_checked(self, request: EncodeRequest) -> EncodeResult:
        req = TextRequest(prompt=request.text, image=request.image)
        ids, pixels = self.prompt_inputs(req)
        names = list(request.saes) or list(self.saes)
        text_names = [n for n in names if n not in self.vision_saes]
        vision_names = [n for n in names if n in self.vision_saes]
        probe_saes = [n for n, _ in self.risk_probe.layout.saes] if self.risk_probe is not None else []
        read = list(dict.fromkeys(names + probe_saes))
        device = next(self.model.parameters()).device
        inputs: dict[str, Any] = {"input_ids": torch.tensor([ids], device=device)}
        if pixels is not None:
            inputs["pixel_values"] = pixels.to(device)
        with torch.no_grad():
            ctx = SteeringContext(self.model, self.attached, [None], ReadoutSpec(tuple(read), request.top_k))
            with ctx:
                ctx.prefill()
                self.model(**inputs)
            readout = ctx.readouts()[0]
        risk = None
        if self.risk_probe is not None:
            d_sae = {n: self.saes[n].d_sae for n in probe_saes}
            risk = self.risk_probe.score_prompt(risk_pools(readout, probe_saes, d_sae, with_generated=False))
        return EncodeResult(
            tokens=tuple(self.tokenizer.decode([i]) for i in ids),
            latents=tuple(position_latents(readout, "prefill", text_names, request.top_k, self.labels)) if text_names else tuple(() for _ in ids),
            pooled=pooled_latents(readout, names, request.top_k, self.labels),
            risk=risk,
            vision_latents=tuple(position_latents(readout, "prefill", vision_names, request.top_k, self.labels)) if vision_names else (),
        )


class _VisionPlugin:
    """The image modality of the text engine: encode admitted rows' images, feed their prefill."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def admit(self, rows: Sequence[tuple[SequenceRun, PreparedText]], plans: PlanTable) -> None:
        """One vision forward for the admitted rows with images, each under its own slot's edits."""
        with_image = [(seq, p) for seq, p in rows if p.pixel_values is not None]
        if not with_image:
            return
        device = next(self.model.parameters()).device
        pixels = torch.cat([p.pixel_values for _, p in with_image]).to(device)
        plans.context.set_phase("prefill", vision_rows=[seq.slot for seq, _ in with_image])
        with torch.no_grad():
            features = self.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        for (seq, _), f in zip(with_image, features):
            seq.features = f

    def prefill_inputs(self, rows: Sequence[SequenceRun]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = [r.features for r in rows if r.features is not None]
        for r in rows:
            r.features = None  # used once, by this prefill
        if not features:
            return {}
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}


__all__ = ["LlavaBackend"]
