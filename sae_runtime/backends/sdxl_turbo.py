"""SDXL-Turbo backend: StableDiffusionXLPipeline with SAEs on U-Net transformer blocks.

Each SAE reads a transformer block's UPDATE (output minus input), NCHW permuted to NHWC, one SAE
input per spatial position (sdxl-unbox). A request's plan edits that update per position:

    update' = update + w(p) * (edit(update) - update)

where ``w(p)`` is the request's spatial mask (image resolution, area-downsampled to the block's
grid; 1 everywhere without a mask) and ``edit`` is the latent edit of reference.md section 4
(error term kept by default). Edits apply only on denoising steps in the plan's window
[step_start, step_end) and on the chosen classifier-free-guidance half (the pipeline stacks the
U-Net batch as [uncond rows, cond rows]; without CFG every row is ``cond``).

The sdxl-unbox intervention "strength * W_dec[i] at every position" is ``add strength`` on latent
i; "times the latent's own activation map" is ``scale (1 + strength)``; "times its mean
activation" is ``add strength * mean[i]`` (the client has mean[i] from a readout).

Requests that share steps, guidance and size run as one batched pipeline call (one generator per
row, so a row's image does not depend on its batch mates); ``include_default`` adds the unsteered
twin (same prompt and seed) as one more row of the same call.
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
from sae_runtime.backends.spec import Limits, ModelSpec
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
from sae_runtime.plan import CfgHalf, EditOp, InterventionPlan, LatentEdit, ReadoutSpec
from sae_runtime.saes.base import Sae


def block_path(hook_name: str) -> str:
    """Module path under the U-Net of a hook name: ``unet.up_blocks.0.attentions.1`` or without ``unet.``."""
    return hook_name[len("unet.") :] if hook_name.startswith("unet.") else hook_name


def resolve_block(unet: nn.Module, hook_name: str, field: str = "hook_name") -> nn.Module:
    """The transformer block a hook name names; NotFound unless it is a Transformer2DModel-like block."""
    try:
        module = unet.get_submodule(block_path(hook_name))
    except AttributeError:
        raise NotFound(f"the U-Net has no module {hook_name!r}", field=field) from None
    if not (hasattr(module, "proj_in") and hasattr(module, "proj_out") and hasattr(module, "transformer_blocks")):
        raise NotFound(f"{hook_name!r} is a {type(module).__name__}, not a U-Net transformer block", field=field)
    return module


@dataclass
class _Row:
    """One image row of a batched pipeline call."""

    plan: InterventionPlan
    readout: ReadoutSpec | None
    masks: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # block (h, w) -> mask cells
    maps: dict[str, Tensor] = field(default_factory=dict)  # sae -> summed latents (h, w, d_sae)
    steps_read: dict[str, int] = field(default_factory=dict)


@dataclass
class _Run:
    """State of one pipeline call, read by the block hooks. ``step`` is set before each U-Net forward."""

    rows: list[_Row]
    cfg: bool
    step: int = -1

    def batch_rows(self, n: int) -> list[tuple[_Row, CfgHalf]]:
        """(row, half) for each of the U-Net's ``n`` batch entries: [uncond rows, cond rows] with CFG."""
        if self.cfg:
            return [(r, CfgHalf.UNCOND) for r in self.rows] + [(r, CfgHalf.COND) for r in self.rows]
        return [(r, CfgHalf.COND) for r in self.rows]


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
    ) -> None:
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.saes = dict(saes)
        self.name, self.description, self.limits, self.version = name, description, limits, version
        self._run: _Run | None = None
        self._blocks: dict[str, list[str]] = {}  # block path -> SAE names reading it
        for sae_name, sae in self.saes.items():
            if not sae.cfg.hook_name:
                raise InvalidArgument(f"SAE {sae_name!r} names no hook site", field=f"saes.{sae_name}.hook_name")
            block = resolve_block(pipe.unet, sae.cfg.hook_name, field=f"saes.{sae_name}.hook_name")
            channels = block.proj_out.out_features if isinstance(block.proj_out, nn.Linear) else block.proj_out.out_channels
            if channels != sae.d_in:
                raise InvalidArgument(f"SAE d_in {sae.d_in} != {channels} channels of {sae.cfg.hook_name}", field=f"saes.{sae_name}.d_in")
            sae.eval().requires_grad_(False)
            self._blocks.setdefault(block_path(sae.cfg.hook_name), []).append(sae_name)
        self._handles = [
            pipe.unet.get_submodule(path).register_forward_hook(self._make_hook(names), with_kwargs=True)
            for path, names in self._blocks.items()
        ]
        self._handles.append(pipe.unet.register_forward_pre_hook(self._count_step))
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        #: Image sides must be multiples of this (VAE and U-Net downsampling, and diffusers' 8).
        self.size_multiple = int(np.lcm(8, vae_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)))
        self.default_side = int(pipe.unet.config.sample_size) * vae_factor

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "SdxlTurboBackend":
        """Load the pipeline (``from_pretrained``: a directory or hub id) and the SAEs ``spec`` names."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(spec.path, torch_dtype=getattr(torch, spec.dtype)).to(spec.device)
        from sae_runtime.formats import load_sae  # owned by the formats module

        saes = {}
        for s in spec.saes:
            sae = load_sae(s.path, format=s.format)
            if s.hook_name:
                sae.cfg = sae.cfg.replace(hook_name=s.hook_name)
            saes[s.name] = sae.to(spec.device)
        return cls(pipe, saes, name=spec.name, description=spec.description, limits=spec.limits)

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
                SaeInfo(name=n, hook_name=s.cfg.hook_name or "", architecture=s.cfg.architecture, d_in=s.d_in,
                        d_sae=s.d_sae, has_labels=bool(s.labels), version=self.version)
                for n, s in self.saes.items()
            ),
            has_risk_probe=False,
            version=self.version,
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
        plan = request.plan.resolve(self.saes, max_edits=self.limits.max_edits, field_prefix=f"{p}plan")
        scope = plan.scope
        if scope.mask is not None and tuple(scope.mask.shape) != (height, width):
            raise InvalidArgument(f"mask is {tuple(scope.mask.shape)}, the image is {(height, width)} (H, W)", field=f"{p}plan.scope.mask")
        if plan.edits and scope.cfg_half is CfgHalf.UNCOND and guidance <= 1.0:
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
        """Generate for validated requests; requests sharing steps, guidance and size share one call."""
        if len(requests) > self.limits.max_batch_size:
            raise TooLarge(f"batch of {len(requests)} exceeds {self.limits.max_batch_size}", field="requests")
        results: list[ImageResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.num_inference_steps, r.guidance_scale, r.height, r.width), []).append(i)
        for idx in groups.values():
            for i, res in zip(idx, self._generate_group([requests[i] for i in idx])):
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

    @torch.inference_mode()
    def _call_pipe(self, rows: list[_Row], prompts, negatives, seeds, first: ImageRequest) -> list:
        device = self.pipe.device
        cfg = first.guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None
        self._run = _Run(rows=rows, cfg=cfg)
        try:
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
            self._run = None
        return out.images

    # -- hooks -------------------------------------------------------------------------------
    def _count_step(self, module: nn.Module, args: Any) -> None:
        if self._run is not None:
            self._run.step += 1

    def _make_hook(self, sae_names: list[str]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            run = self._run
            if run is None:
                return None
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output.sample
            edited = self._edit_block(run, sae_names, x_in, x_out)
            if edited is None:
                return None
            if isinstance(output, tuple):
                return (edited,) + tuple(output[1:])
            output.sample = edited
            return output

        return hook

    def _edit_block(self, run: _Run, sae_names: list[str], x_in: Tensor, x_out: Tensor) -> Tensor | None:
        """Apply each row's edits (and record readouts) on a block's update; None when nothing changes."""
        n, c, h, w = x_out.shape
        entries = run.batch_rows(n)
        update = (x_out - x_in).permute(0, 2, 3, 1).reshape(n, h * w, c)  # NHWC, one row per position
        new_update = None
        for sae_name in sae_names:
            sae = self.saes[sae_name]
            for b, (row, half) in enumerate(entries):
                plan = row.plan
                edits = [e for e in plan.edits if e.sae == sae_name]
                want_read = half is CfgHalf.COND and row.readout is not None and sae_name in row.readout.saes
                in_window = plan.scope.step_start <= run.step and (plan.scope.step_end is None or run.step < plan.scope.step_end)
                in_half = plan.scope.cfg_half in (CfgHalf.BOTH, half)
                if not (want_read or (edits and in_window and in_half)):
                    continue
                x = (new_update if new_update is not None else update)[b].to(sae.W_dec.dtype)
                weight = self._mask_cells(row, h, w, x.device) if edits and in_window and in_half else None
                x_new, latents_after = _apply_row_edits(
                    sae, x, edits if (in_window and in_half) else [], preserve_error=plan.preserve_error,
                    weight=weight, want_latents=want_read,
                )
                if want_read:
                    acc = row.maps.get(sae_name)
                    grid = latents_after.reshape(h, w, -1).float()
                    row.maps[sae_name] = grid if acc is None else acc + grid
                    row.steps_read[sae_name] = row.steps_read.get(sae_name, 0) + 1
                if x_new is not None:
                    if new_update is None:
                        new_update = update.clone()
                    new_update[b] = x_new.to(update.dtype)
        if new_update is None:
            return None
        return x_in + new_update.reshape(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    def _mask_cells(row: _Row, h: int, w: int, device: torch.device) -> Tensor | None:
        mask = row.plan.scope.mask
        if mask is None:
            return None
        if (h, w) not in row.masks:
            row.masks[(h, w)] = images.resize_mask(mask, (h, w)).reshape(h * w, 1).to(device)
        return row.masks[(h, w)]

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


# -- edit math (a local adapter until sae_runtime.steering offers a per-row entry point) ---------
def _edit_latents(f: Tensor, idx: list[int], edits: Sequence[LatentEdit], x_norm: Tensor | None, rows_norm: Tensor | None, scale: Tensor | float) -> Tensor:
    """Apply ``edits`` in order to f (P, k), whose columns are the latents ``idx``; returns f'."""
    f = f.clone()
    col = {i: n for n, i in enumerate(idx)}
    for e in edits:
        cols = [col[i] for i in e.latents]
        cur = f[:, cols]
        if e.op is EditOp.SET:
            new = torch.full_like(cur, e.value)
        elif e.op is EditOp.ABLATE:
            new = torch.zeros_like(cur)
        elif e.op is EditOp.SCALE:
            new = cur * e.value
        elif e.op is EditOp.CAP:
            new = torch.minimum(cur, torch.full_like(cur, e.value))
        elif e.normalize:  # add, norm-relative: x += value * ||x|| * W_dec[i] / ||W_dec[i]||
            new = cur + e.value * x_norm / (rows_norm[cols] * scale)
        else:
            new = cur + e.value
        f[:, cols] = new
    return f


def _apply_row_edits(
    sae: Sae, x: Tensor, edits: Sequence[LatentEdit], *, preserve_error: bool, weight: Tensor | None, want_latents: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Edit one row's activations x (P, d_in) at P positions; returns (x' or None, latents or None).

    x' = x + weight * (edit(x) - x), weight (P, 1) in [0, 1] or None (= 1). With ``preserve_error``
    edit(x) = x + norm_scale * (f' - f)[edited] @ W_dec[edited]; without, edit(x) = D(f').
    The latents returned (P, d_sae) are the clean encode with the edited latents replaced by f'
    (blended by ``weight`` like the activations).
    """
    x_n, norm = sae.normalize(x)
    scale = 1.0 if norm is None else norm.scale
    idx = list(dict.fromkeys(i for e in edits for i in e.latents))
    full = sae.encode_normalized(x_n) if (want_latents or (edits and not preserve_error)) else None
    if not edits:
        return None, full
    idx_t = torch.tensor(idx, device=x.device)
    rows = sae.decoder_rows(idx_t)
    f = full.index_select(-1, idx_t) if full is not None else sae.encode_selected_normalized(x_n, idx_t)
    x_norm = x.norm(dim=-1, keepdim=True) if any(e.normalize for e in edits) else None
    f_new = _edit_latents(f, idx, edits, x_norm, rows.norm(dim=-1), scale)
    if preserve_error:
        x_edit = x + scale * ((f_new - f) @ rows)
    else:
        f_all = full.clone()
        f_all[:, idx_t] = f_new
        x_edit = sae.decode(f_all, norm)
    x_out = x_edit if weight is None else x + weight * (x_edit - x)
    if full is not None:
        full = full.clone()
        full[:, idx_t] = f_new if weight is None else f + weight * (f_new - f)
    return x_out, full
