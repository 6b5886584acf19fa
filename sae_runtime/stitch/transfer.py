"""Carry an SAE, its labels, its risk probe and steering directions from model A to model B.

The transferred SAE is T_up o SAE o T_down collapsed into one SAE on B (seed-methods.md section 4,
eq. 6): with pre-acts ``(x_A - b_dec) @ W_enc + b_enc`` on A and ``x_A = x_B @ P_down + b_down``,

    W_enc' = P_down @ W_enc,  b_enc' = (b_down - b_dec) @ W_enc + b_enc    (apply_b_dec_to_input)
                              b_enc' = b_down @ W_enc + b_enc              (otherwise)
    W_dec' = W_dec @ P_up,    b_dec' = b_dec @ P_up + b_up

and the new SAE does not subtract b_dec' from its input (``apply_b_dec_to_input = False``), so
its latents on h_B equal the original's latents on T_down(h_B) exactly, and its reconstruction
is T_up of the original's. A TopK SAE with ``rescale_acts_by_decoder_norm`` has the original
decoder norms folded into W_enc' / b_enc' and W_dec' (its latents stay the same). Thresholds
(jumprelu, batchtopk) carry over unchanged. Architectures whose encode is not affine in the input
before the nonlinearity (gated, topk-sigmoid, spade) or input normalisations that are not affine
(constant_norm_rescale, layer_norm) are refused.

Labels copy over (latent i is still latent i). The risk probe reads pooled latents, which on B
are the original latents of T_down(h_B): the probe carries over unchanged (the direction
``w @ P_down^T`` of the paper, applied through the SAE). Steering vectors map through P_up
without the bias and are renormalised.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from sae_runtime.errors import InvalidArgument
from sae_runtime.risk import RiskProbe
from sae_runtime.saes.base import Sae, build_sae
from sae_runtime.stitch.maps import Stitch

TRANSFERABLE = ("standard", "jumprelu", "batchtopk", "topk")


def transfer_sae(sae: Sae, stitch: Stitch) -> Sae:
    """The SAE on B (d_in = d_B, same d_sae, labels and latent statistics) equivalent to ``sae``
    read through the stitch (see module doc); float32, on the CPU."""
    cfg = sae.cfg
    if cfg.architecture not in TRANSFERABLE:
        raise InvalidArgument(f"cannot transfer a {cfg.architecture!r} SAE (use one of {TRANSFERABLE})", field="architecture")
    if cfg.normalize_activations not in ("none", "expected_average_only_in"):
        raise InvalidArgument(f"input normalisation {cfg.normalize_activations!r} is not affine; cannot transfer", field="normalize_activations")
    if cfg.d_in != stitch.d_a:
        raise InvalidArgument(f"the SAE reads {cfg.d_in} dims, the stitch's A side has {stitch.d_a}", field="stitch")
    if stitch.hook_a and cfg.hook_name and stitch.hook_a != cfg.hook_name:
        raise InvalidArgument(f"the SAE reads {cfg.hook_name!r}, the stitch was fitted at {stitch.hook_a!r}", field="stitch.hook_a")
    with torch.no_grad():
        w_enc, b_enc = sae.W_enc.double(), sae.b_enc.double()
        w_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()
        p_up, b_up, p_down, b_down = (t.double() for t in (stitch.P_up, stitch.b_up, stitch.P_down, stitch.b_down))
        shift = b_down - b_dec if cfg.apply_b_dec_to_input else b_down
        new_w_enc, new_b_enc = p_down @ w_enc, shift @ w_enc + b_enc
        rescale = cfg.architecture == "topk" and cfg.rescale_acts_by_decoder_norm
        if rescale:  # pre-acts were multiplied by ||W_dec[i]|| and latents divided by it before decode
            norms = w_dec.norm(dim=-1)
            new_w_enc, new_b_enc, w_dec = new_w_enc * norms, new_b_enc * norms, w_dec / norms[:, None]
        new_w_dec, new_b_dec = w_dec @ p_up, b_dec @ p_up + b_up
    meta = dict(cfg.metadata) | {
        "transferred_from": {"model": cfg.model_name, "hook_name": cfg.hook_name, "d_in": cfg.d_in, "stitch": stitch.meta.get("name")},
    }
    new_cfg = cfg.replace(
        d_in=stitch.d_b, dtype="float32", apply_b_dec_to_input=False, normalize_activations="none",
        rescale_acts_by_decoder_norm=False, hook_name=stitch.hook_b or cfg.hook_name, model_name=stitch.model_b, metadata=meta,
    )  # fmt: skip
    out = build_sae(new_cfg)
    state = {k: v.detach().float().cpu().clone() for k, v in sae.state_dict().items()}
    state.update(W_enc=new_w_enc.float(), b_enc=new_b_enc.float(), W_dec=new_w_dec.float(), b_dec=new_b_dec.float())
    for name in ("latent_mean", "latent_std"):
        if name in state:
            out.register_buffer(name, state[name])
    out.load_state_dict(state, strict=True)
    out.labels = dict(sae.labels)
    return out.eval()


def transfer_direction(v: Tensor, stitch: Stitch, *, to: str = "b") -> Tensor:
    """A steering direction of A (d_A,) mapped to B as ``v @ P_up`` (``to="b"``), or one of B
    mapped to A as ``v @ P_down`` (``to="a"``), without the bias, renormalised to ``||v||``."""
    if to not in ("a", "b"):
        raise InvalidArgument("must be 'a' or 'b'", field="to")
    p = stitch.P_up if to == "b" else stitch.P_down
    if v.shape[-1] != p.shape[0]:
        raise InvalidArgument(f"direction has {v.shape[-1]} dims, expected {p.shape[0]}", field="direction")
    mapped = v.float() @ p
    return mapped * (v.float().norm(dim=-1, keepdim=True) / mapped.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def transfer_probe(probe: RiskProbe, stitch: Stitch, renames: dict[str, str] | None = None) -> RiskProbe:
    """The risk probe for the transferred SAEs on B: the same heads (the transferred SAE's latents
    on B are the original's on T_down(h_B)), SAEs optionally renamed (``renames`` old -> new)."""
    renames = renames or {}
    out = copy.deepcopy(probe)
    out.layout = type(probe.layout)(tuple((renames.get(n, n), d) for n, d in probe.layout.saes))
    out.latent_labels = {renames.get(n, n): dict(v) for n, v in probe.latent_labels.items()}
    out.meta = dict(probe.meta) | {"transferred": {"stitch": stitch.meta.get("name"), "model_a": stitch.model_a, "model_b": stitch.model_b}}
    return out


__all__ = ["TRANSFERABLE", "transfer_direction", "transfer_probe", "transfer_sae"]
