"""SDXL-Turbo backend: StableDiffusionXLPipeline with SAEs on U-Net transformer blocks.

Each SAE reads a transformer block's UPDATE (output minus input), NCHW permuted to NHWC, one SAE
input per spatial position (sdxl-unbox; site ``unet.<block path>``, see :mod:`sae_runtime.sites`).
A request's plan edits that update per position (reference.md section 4, error term kept by
default), applied by a :class:`~sae_runtime.steering.SteeringContext` inside the pipeline's own
U-Net forwards:

- ``scope.mask``: (H, W) at image resolution, values in [0, 1], area-averaged down to each
  block's grid; a cell's edit is weighted by its mask value (soft edges);
- ``scope.step_start``/``step_end``: the denoising steps [start, end) that are edited;
- ``scope.cfg_half``: the classifier-free-guidance half edited (the pipeline stacks the U-Net
  batch as [uncond rows, cond rows]; without guidance every row is ``cond``).

The sdxl-unbox intervention "strength * W_dec[i] at every position" is ``add strength`` on latent
i; "times the latent's own activation map" is ``scale (1 + strength)``; "times its mean
activation" is ``add strength * mean[i]`` (mean[i] from a readout, or the SAE's ``latent_mean``).

Requests that share steps, guidance and size run as ONE batched pipeline call, one generator per
row (diffusers draws each row's initial latents from its own generator, so a row's image does not
depend on its batch mates up to float rounding); ``include_default`` adds the unsteered twin
(same prompt and seed) as one more row of the same call.

Readouts (latent maps): per requested SAE, the top-k latents by mean activation over the block's
positions, each with its (h, w) map and a heatmap PNG over the image. The maps are the SAE's
encoding of the block's update AS THE STEERED IMAGE COMPUTED IT (edits included), on the cond
half, averaged over the denoising steps.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sae_runtime.backends import images
from sae_runtime.backends.plan_resources import build_plan_resources
from sae_runtime.backends.spec import Limits, ModelSpec, VectorSpec
from sae_runtime.backends.types import (
    Backend,
    EncodeRequest,
    EncodeResult,
    ImageRequest,
    ImageResult,
    LatentActivation,
    LatentMap,
    ModelInfo,
    PooledLatents,
    SaeInfo,
    TextRequest,
    Timings,
    label_of,
)
from sae_runtime.errors import InvalidArgument, NotFound, TooLarge, require_finite
from sae_runtime.plan import CfgHalf, InterventionPlan, ReadoutSpec, check_scope_applies, check_seed
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite, SiteKind
from sae_runtime.steering import AttachedSae, SteeringContext, check_widths


@dataclass
class _Row:
    """One image row of a batched pipeline call, and the latent maps it reads."""

    plan: InterventionPlan
    readout: ReadoutSpec | None
    maps: dict[str, Tensor] = field(default_factory=dict)  # sae -> latents summed over steps (h, w, d_sae)
    steps_read: dict[str, int] = field(default_factory=dict)


@dataclass
class _Run:
    """One pipeline call: its rows, the steering context, and the step the next U-Net forward runs."""

    rows: list[_Row]
    cfg: bool
    num_steps: int
    ctx: SteeringContext | None
    step: int = 0


class SdxlTurboBackend(Backend):
    """A StableDiffusionXLPipeline and its U-Net SAEs (name -> Sae with ``cfg.hook_name`` set)."""

    kind = "sdxl_turbo"

    def __init__(
        self,
        pipe: Any,
        saes: Mapping[str, Sae],
        *,
        name: str = "sdxl_turbo",
        description: str = "",
        limits: Limits = Limits(),
        version: str = "",
        vectors: Sequence[VectorSpec] = (),
        presets: Sequence[tuple[str, InterventionPlan]] = (),
        label_indexes: Mapping[str, Any] | None = None,
    ) -> None:
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.saes = dict(saes)
        self.name, self.description, self.limits, self.version = name, description, limits, version
        self._run: _Run | None = None
        self.attached: dict[str, AttachedSae] = {}
        blocks: dict[HookSite, list[str]] = {}
        for sae_name, sae in self.saes.items():
            if not sae.cfg.hook_name:
                raise InvalidArgument(f"SAE {sae_name!r} names no hook site", field=f"saes.{sae_name}.hook_name")
            site = HookSite.parse(sae.cfg.hook_name, field=f"saes.{sae_name}.hook_name")
            if site.kind is not SiteKind.UNET_BLOCK:
                raise InvalidArgument(f"site {site.name} is not a U-Net transformer block", field=f"saes.{sae_name}.hook_name")
            sae.eval().requires_grad_(False)
            self.attached[sae_name] = AttachedSae(sae_name, sae, site)
            blocks.setdefault(site, []).append(sae_name)
        check_widths(pipe.unet, self.attached)
        if label_indexes is not None:
            self.label_indexes = dict(label_indexes)
        self.plan_resources = build_plan_resources(
            pipe.unet, self.saes, {n: a.site for n, a in self.attached.items()}, limits=limits, vectors=vectors,
            presets=presets, describe=self.describe, device=pipe.unet.device, dtype=pipe.unet.dtype)
        # Map recorders run after the steering hooks (those are prepended when a run starts).
        self._handles = [site.resolve(pipe.unet).register_forward_hook(self._map_recorder(names), with_kwargs=True)
                         for site, names in blocks.items()]
        self._handles.append(pipe.unet.register_forward_pre_hook(self._before_unet))
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        #: Image sides must be multiples of this (VAE and U-Net downsampling, and diffusers' 8).
        self.size_multiple = int(np.lcm(8, vae_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)))
        self.default_side = int(pipe.unet.config.sample_size) * vae_factor

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "SdxlTurboBackend":
        """Load the pipeline (``from_pretrained``: a directory or hub id) and the SAEs ``spec`` names."""
        from diffusers import StableDiffusionXLPipeline

        from sae_runtime.errors import FormatError
        from sae_runtime.backends.loading import load_spec_saes
        from sae_runtime.search import build_label_indexes

        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(spec.path, dtype=getattr(torch, spec.dtype))
        except (OSError, ValueError) as err:
            raise FormatError(f"cannot load a StableDiffusionXLPipeline: {err}", field=spec.path) from None
        pipe = pipe.to(spec.device)
        saes, load_timings = load_spec_saes(spec)
        backend = cls(pipe, saes, name=spec.name, description=spec.description, limits=spec.limits, vectors=spec.vectors,
                      presets=spec.presets,
                      label_indexes=build_label_indexes(saes))  # label embeddings, once per SAE
        backend.load_timings = load_timings
        return backend

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

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
            has_risk_probe=False,
            version=self.version,
            presets=tuple(self.plan_resources.presets),
            vectors=tuple((n, v.site.name) for n, v in self.plan_resources.vectors.items()),
        )

    # -- validation --------------------------------------------------------------------------
    def validate(self, request: TextRequest | ImageRequest | EncodeRequest, field_prefix: str = "") -> ImageRequest | EncodeRequest:
        p = field_prefix
        if isinstance(request, EncodeRequest):
            if request.image is not None:
                raise InvalidArgument("sdxl_turbo encodes a text prompt, not an image", field=f"{p}image")
            for n, s in enumerate(request.saes):
                if s not in self.saes:
                    raise NotFound(f"unknown SAE {s!r}", field=f"{p}saes[{n}]")
            if not 0 < request.top_k <= 256:
                raise InvalidArgument("top_k must be in [1, 256]", field=f"{p}top_k")
            return request
        if not isinstance(request, ImageRequest):
            raise InvalidArgument(f"sdxl_turbo generates images, got a {type(request).__name__}", field=p.rstrip(".") or None)
        steps = request.num_inference_steps
        if not 1 <= steps:
            raise InvalidArgument("num_inference_steps must be >= 1", field=f"{p}num_inference_steps")
        if steps > self.limits.max_inference_steps:
            raise TooLarge(f"{steps} steps exceed the limit of {self.limits.max_inference_steps}", field=f"{p}num_inference_steps")
        guidance = require_finite(request.guidance_scale, f"{p}guidance_scale")
        if guidance < 0:
            raise InvalidArgument("guidance_scale must be >= 0", field=f"{p}guidance_scale")
        height = self._check_side(request.height, f"{p}height")
        width = self._check_side(request.width, f"{p}width")
        plan = self.plan_resources.resolve(request.plan, field_prefix=f"{p}plan")
        check_scope_applies(plan.scope, self.kind, f"{p}plan.scope")
        check_seed(request.seed, f"{p}seed")
        scope = plan.scope
        if scope.mask is not None and tuple(scope.mask.shape) != (height, width):
            raise InvalidArgument(f"mask is {tuple(scope.mask.shape)}, the image is {(height, width)} (H, W)", field=f"{p}plan.scope.mask")
        if not plan.is_empty and scope.cfg_half is CfgHalf.UNCOND and guidance <= 1.0:
            raise InvalidArgument("cfg_half 'uncond' needs guidance_scale > 1 (without guidance there is no uncond half)", field=f"{p}plan.scope.cfg_half")
        if request.readout is not None:
            request.readout.check(self.saes, field_prefix=f"{p}readout")
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        return replace(request, plan=plan, height=height, width=width, seed=seed, guidance_scale=guidance)

    def _check_side(self, side: int | None, field: str) -> int:
        if side is None:
            return self.default_side
        if side <= 0 or side % self.size_multiple:
            raise InvalidArgument(f"must be a positive multiple of {self.size_multiple}, got {side}", field=field)
        if side > self.limits.max_image_side:
            raise TooLarge(f"{side} pixels exceed the limit of {self.limits.max_image_side}", field=field)
        return side

    # -- generation --------------------------------------------------------------------------
    def generate_images(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        """Generate for a batch of requests (validated again here: cheap and idempotent).

        Requests sharing steps, guidance and size share one pipeline call of at most
        ``limits.max_batch_size`` image rows (unsteered twins count as rows).
        """
        checked = [self.validate(r, f"requests[{i}]." if len(requests) > 1 else "") for i, r in enumerate(requests)]
        results: list[ImageResult | None] = [None] * len(checked)
        groups: dict[tuple, list[list[int]]] = {}
        for i, r in enumerate(checked):
            chunks = groups.setdefault((r.num_inference_steps, r.guidance_scale, r.height, r.width), [[]])
            rows = sum(2 if checked[j].include_default else 1 for j in chunks[-1])
            if chunks[-1] and rows + (2 if r.include_default else 1) > max(self.limits.max_batch_size, 2):
                chunks.append([])
            chunks[-1].append(i)
        for chunks in groups.values():
            for idx in chunks:
                for i, res in zip(idx, self._generate_group([checked[i] for i in idx])):
                    results[i] = res
        return results  # type: ignore[return-value]

    def _generate_group(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        t0 = time.perf_counter()
        rows, prompts, negatives, seeds, owner = [], [], [], [], []
        for i, r in enumerate(requests):
            twins = [(r.plan, r.readout)] + ([(InterventionPlan(), None)] if r.include_default else [])
            for plan, readout in twins:
                rows.append(_Row(plan=plan, readout=readout))
                prompts.append(r.prompt)
                negatives.append(r.negative_prompt)
                seeds.append(r.seed)
                owner.append(i)
        first = requests[0]
        pil = self._call_pipe(rows, prompts, negatives, seeds, first)
        compute_ms = (time.perf_counter() - t0) * 1000.0
        out: list[ImageResult] = []
        row = 0
        for r in requests:
            steered, steered_row = pil[row], rows[row]
            default = pil[row + 1] if r.include_default else None
            row += 2 if r.include_default else 1
            out.append(
                ImageResult(
                    png=images.encode_png(steered),
                    default_png=images.encode_png(default) if default is not None else None,
                    latent_maps=self._latent_maps(steered_row, steered),
                    timings=Timings(compute_ms=compute_ms),
                )
            )
        return out

    @torch.no_grad()
    def _call_pipe(self, rows: list[_Row], prompts, negatives, seeds, first: ImageRequest) -> list:
        """One pipeline call for ``rows`` (all with ``first``'s steps, guidance and size); PIL images."""
        device = self.pipe.device
        cfg = first.guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None
        plans = [None if r.plan.is_empty else r.plan for r in rows]
        ctx = SteeringContext(self.pipe.unet, self.attached, plans) if any(plans) else None
        self._run = _Run(rows=rows, cfg=cfg, num_steps=first.num_inference_steps, ctx=ctx)
        try:
            if ctx is not None:
                ctx.__enter__()
            out = self.pipe(
                prompt=list(prompts),
                negative_prompt=list(negatives) if cfg else None,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                height=first.height,
                width=first.width,
                generator=[torch.Generator(device=device).manual_seed(int(s)) for s in seeds],
                output_type="pil",
            )
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            self._run = None
        return out.images

    # -- hooks -------------------------------------------------------------------------------
    def _before_unet(self, module: nn.Module, args: Any) -> None:
        """Tell the steering context which denoising step (and batch layout) the U-Net runs next."""
        run = self._run
        if run is None:
            return
        if run.ctx is not None:
            run.ctx.set_unet_step(run.step, run.num_steps, run.cfg)
        run.step += 1

    def _map_recorder(self, sae_names: list[str]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            run = self._run
            if run is None:
                return
            readers = [(j, r) for j, r in enumerate(run.rows) if r.readout is not None and any(n in r.readout.saes for n in sae_names)]
            if not readers:
                return
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output.sample
            offset = len(run.rows) if run.cfg else 0  # cond rows follow the uncond rows
            idx = torch.tensor([offset + j for j, _ in readers], device=x_out.device)
            update = (x_out.index_select(0, idx) - x_in.index_select(0, idx)).permute(0, 2, 3, 1)  # (R, h, w, C)
            with torch.no_grad():
                for name in sae_names:
                    sae = self.saes[name]
                    latents = sae.encode(update.to(sae.W_dec.dtype)).float()
                    for k, (_, row) in enumerate(readers):
                        if name in row.readout.saes:
                            acc = row.maps.get(name)
                            row.maps[name] = latents[k] if acc is None else acc + latents[k]
                            row.steps_read[name] = row.steps_read.get(name, 0) + 1

        return hook

    # -- readouts ----------------------------------------------------------------------------
    def _latent_maps(self, row: _Row, image: Any) -> tuple[LatentMap, ...]:
        """Top-k latents per read SAE by mean activation, with maps averaged over the steps read."""
        if row.readout is None:
            return ()
        out = []
        for sae_name in row.readout.saes:
            if sae_name not in row.maps:
                continue
            grid = row.maps[sae_name] / row.steps_read[sae_name]  # (h, w, d_sae)
            means = grid.mean(dim=(0, 1))
            top = torch.topk(means, k=min(row.readout.top_k, means.numel()))
            for value, i in zip(top.values.tolist(), top.indices.tolist()):
                vals = grid[:, :, i]
                out.append(
                    LatentMap(
                        sae=sae_name,
                        latent=i,
                        label=label_of(self.saes[sae_name].labels, i),
                        mean=float(value),
                        heatmap_png=images.render_heatmap(vals, image),
                        values=tuple(tuple(r) for r in vals.tolist()),
                    )
                )
        return tuple(out)

    def encode(self, request: EncodeRequest) -> EncodeResult:
        """Pooled latents of the requested SAEs over a one-step generation from the prompt (seed 0)."""
        saes = request.saes or tuple(self.saes)
        req = self.validate(ImageRequest(prompt=request.text, seed=0, readout=ReadoutSpec(saes=saes, top_k=request.top_k)))
        row = _Row(plan=req.plan, readout=req.readout)
        self._call_pipe([row], [req.prompt], [req.negative_prompt], [req.seed], req)
        pooled = []
        for name in saes:
            grid = (row.maps[name] / row.steps_read[name]).flatten(0, 1)  # (positions, d_sae)
            pooled.append(PooledLatents(sae=name, top_mean=_top(grid.mean(0), request.top_k, self.saes[name]),
                                        top_max=_top(grid.max(0).values, request.top_k, self.saes[name])))
        return EncodeResult(tokens=(), latents=(), pooled=tuple(pooled))


def _top(values: Tensor, k: int, sae: Sae) -> tuple[LatentActivation, ...]:
    top = torch.topk(values, k=min(k, values.numel()))
    return tuple(LatentActivation(index=i, value=v, label=label_of(sae.labels, i)) for v, i in zip(top.values.tolist(), top.indices.tolist()))

