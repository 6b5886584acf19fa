"""The stitch between two models' residual streams: two affine maps, fitted jointly, saved to disk.

Chen et al., "Transferring Linear Features Across LMs With Model Stitching" (arXiv 2506.06609,
eqs. 1-3; seed-methods.md section 4). Row vectors throughout:

- up   T_up(h_A)   = h_A @ P_up + b_up,     P_up (d_A, d_B), b_up (d_B,)
- down T_down(h_B) = h_B @ P_down + b_down, P_down (d_B, d_A), b_down (d_A,)

Both maps are fitted together on paired activations (the same token seen by both models) with
``L = MSE(T_up A, B) + MSE(T_down B, A) + alpha * (MSE(T_down T_up A, A) + MSE(T_up T_down B, B))``,
alpha = 1 as in the paper, Adam with grad-clip 1.0 and cosine decay. Unlike the paper (nn.Linear
init, biases 0), the weights start at the two ridge least-squares solutions, so a few hundred steps
suffice on the demo's CPU budget; the joint loss then trades the directions off against the
round trips.

On disk a stitch is a directory with ``stitch.safetensors`` (the four tensors) and
``stitch.json`` (format, widths, hook sites and model names of both sides, fit metrics).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sae_runtime.errors import FormatError, InvalidArgument

FORMAT_NAME = "sae_runtime.stitch"
FORMAT_VERSION = 1
TENSORS_FILE = "stitch.safetensors"
CONFIG_FILE = "stitch.json"


@dataclass
class Stitch:
    """Affine maps between model A's site ``hook_a`` (width d_A) and model B's ``hook_b`` (d_B)."""

    P_up: Tensor  # (d_A, d_B)
    b_up: Tensor  # (d_B,)
    P_down: Tensor  # (d_B, d_A)
    b_down: Tensor  # (d_A,)
    hook_a: str | None = None
    hook_b: str | None = None
    model_a: str | None = None
    model_b: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d_a, d_b = self.P_up.shape
        shapes = {"P_up": (d_a, d_b), "b_up": (d_b,), "P_down": (d_b, d_a), "b_down": (d_a,)}
        for name, shape in shapes.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise InvalidArgument(f"{name} has shape {tuple(t.shape)}, expected {shape}", field=name)
            setattr(self, name, t.detach().float().cpu().contiguous())

    @property
    def d_a(self) -> int:
        return self.P_up.shape[0]

    @property
    def d_b(self) -> int:
        return self.P_up.shape[1]

    def up(self, h_a: Tensor) -> Tensor:
        """T_up: (..., d_A) -> (..., d_B)."""
        return h_a @ self.P_up.to(h_a) + self.b_up.to(h_a)

    def down(self, h_b: Tensor) -> Tensor:
        """T_down: (..., d_B) -> (..., d_A)."""
        return h_b @ self.P_down.to(h_b) + self.b_down.to(h_b)

    # -- files ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: getattr(self, k) for k in ("P_up", "b_up", "P_down", "b_down")}, str(d / TENSORS_FILE))
        cfg = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "d_a": self.d_a, "d_b": self.d_b,
            "hook_a": self.hook_a, "hook_b": self.hook_b, "model_a": self.model_a, "model_b": self.model_b, "meta": self.meta,
        }  # fmt: skip
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=float))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Stitch":
        """Read a stitch written by :meth:`save`; FormatError names the file at fault."""
        from sae_runtime.formats.common import read_json, read_safetensors

        d = Path(directory)
        cfg = read_json(d / CONFIG_FILE)
        if cfg.get("format") != FORMAT_NAME or cfg.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} file", field=str(d / CONFIG_FILE))
        t = read_safetensors(d / TENSORS_FILE)
        missing = {"P_up", "b_up", "P_down", "b_down"} - set(t)
        if missing:
            raise FormatError(f"missing tensors {sorted(missing)}", field=str(d / TENSORS_FILE))
        if not all(bool(torch.isfinite(v).all()) for v in t.values()):
            raise FormatError("non-finite stitch weights", field=str(d / TENSORS_FILE))
        try:
            stitch = cls(t["P_up"], t["b_up"], t["P_down"], t["b_down"], cfg.get("hook_a"), cfg.get("hook_b"), cfg.get("model_a"), cfg.get("model_b"), dict(cfg.get("meta") or {}))
        except InvalidArgument as err:
            raise FormatError(str(err), field=str(d / TENSORS_FILE)) from None
        if (stitch.d_a, stitch.d_b) != (cfg.get("d_a"), cfg.get("d_b")):
            raise FormatError(f"widths {(stitch.d_a, stitch.d_b)} differ from the config's", field=str(d / CONFIG_FILE))
        return stitch


# -- fitting --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StitchConfig:
    """Joint fit settings. ``ridge`` is relative to the mean input variance (least-squares init)."""

    steps: int = 400
    batch_size: int = 1024
    lr: float = 3e-4
    alpha: float = 1.0
    ridge: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0


def _ridge_affine(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """(P, b) minimising ||x P + b - y||^2 + ridge * tr(cov x) / d * ||P||^2; x (N, dx), y (N, dy)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * float(torch.diagonal(gram).mean())
    p = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    return p.float(), (my - mx @ p).float()


def stitch_losses(stitch_params: dict[str, Tensor], a: Tensor, b: Tensor, alpha: float) -> dict[str, Tensor]:
    """The four MSE terms (mean over rows and dims) and their weighted sum ``total``."""
    up = a @ stitch_params["P_up"] + stitch_params["b_up"]
    down = b @ stitch_params["P_down"] + stitch_params["b_down"]
    terms = {
        "up": (up - b).pow(2).mean(),
        "down": (down - a).pow(2).mean(),
        "round_a": ((up @ stitch_params["P_down"] + stitch_params["b_down"]) - a).pow(2).mean(),
        "round_b": ((down @ stitch_params["P_up"] + stitch_params["b_up"]) - b).pow(2).mean(),
    }
    terms["total"] = terms["up"] + terms["down"] + alpha * (terms["round_a"] + terms["round_b"])
    return terms


def fraction_unexplained(pred: Tensor, target: Tensor) -> float:
    """sum ||target - pred||^2 / sum ||target - mean||^2 (the FVU of a map)."""
    t, p = target.double(), pred.double()
    return float((t - p).pow(2).sum() / (t - t.mean(0)).pow(2).sum().clamp_min(1e-30))


def fit_stitch(acts_a: Tensor, acts_b: Tensor, cfg: StitchConfig = StitchConfig(), *, eval_a: Tensor | None = None, eval_b: Tensor | None = None, **names: Any) -> Stitch:
    """Fit both maps on paired rows acts_a (N, d_A), acts_b (N, d_B) (row i = the same token).

    ``names`` (hook_a, hook_b, model_a, model_b) are recorded. ``meta`` holds the held-out (or
    training) FVU of each map and round trip, and the fit's FLOPs (torch FlopCounterMode).
    """
    if acts_a.dim() != 2 or acts_b.dim() != 2 or acts_a.shape[0] != acts_b.shape[0] or acts_a.shape[0] < 2:
        raise InvalidArgument(f"need paired rows (N, d_A), (N, d_B), got {tuple(acts_a.shape)} and {tuple(acts_b.shape)}", field="activations")
    from torch.utils.flop_counter import FlopCounterMode

    a_all, b_all = acts_a.float(), acts_b.float()
    counter = FlopCounterMode(display=False)
    with counter:
        p_up, b_up = _ridge_affine(a_all, b_all, cfg.ridge)
        p_down, b_down = _ridge_affine(b_all, a_all, cfg.ridge)
    init_flops = counter.get_total_flops()
    params = {k: v.clone().requires_grad_(True) for k, v in {"P_up": p_up, "b_up": b_up, "P_down": p_down, "b_down": b_down}.items()}
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    n = a_all.shape[0]
    step_flops = 0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1)))
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        counter = FlopCounterMode(display=False)
        with counter if step == 0 else contextlib.nullcontext():
            loss = stitch_losses(params, a_all[idx], b_all[idx], cfg.alpha)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if step == 0:
            step_flops = counter.get_total_flops()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
    stitch = Stitch(*(params[k].detach() for k in ("P_up", "b_up", "P_down", "b_down")), **names)
    ea, eb = (eval_a, eval_b) if eval_a is not None and eval_b is not None else (a_all, b_all)
    with torch.no_grad():
        ea, eb = ea.float(), eb.float()
        stitch.meta = {
            "fvu_up": fraction_unexplained(stitch.up(ea), eb),
            "fvu_down": fraction_unexplained(stitch.down(eb), ea),
            "fvu_round_a": fraction_unexplained(stitch.down(stitch.up(ea)), ea),
            "fvu_round_b": fraction_unexplained(stitch.up(stitch.down(eb)), eb),
            "held_out": eval_a is not None,
            "n_tokens": n,
            "flops": int(init_flops + step_flops * cfg.steps),
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        }
    return stitch


# -- layer choice ---------------------------------------------------------------------------------
def svcca(x: Tensor, y: Tensor, keep_variance: float = 0.99) -> float:
    """Mean SVCCA correlation of paired rows x (N, dx), y (N, dy) (Raghu et al. 2017).

    Each side is centred and reduced to the top singular directions holding ``keep_variance`` of
    its variance; the canonical correlations of the reduced pair are the singular values of
    Qx^T Qy (Q: orthonormal bases of the reduced data); their mean is returned, in [0, 1].
    """

    def reduce(m: Tensor) -> Tensor:
        m = m.double() - m.double().mean(0)
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        share = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-30)
        k = int((share < keep_variance).sum()) + 1
        return u[:, :k]  # orthonormal columns spanning the kept directions

    qx, qy = reduce(x), reduce(y)
    rho = torch.linalg.svdvals(qx.T @ qy).clamp(0, 1)
    return float(rho.mean())


def pick_layer(acts_a: Tensor, candidates: dict[str, Tensor], keep_variance: float = 0.99) -> tuple[str, dict[str, float]]:
    """The candidate site of B (name -> rows paired with ``acts_a``) with the highest SVCCA."""
    if not candidates:
        raise InvalidArgument("no candidate layers", field="layer_b")
    scores = {name: svcca(acts_a, acts, keep_variance) for name, acts in candidates.items()}
    return max(scores, key=lambda k: scores[k]), scores


__all__ = ["Stitch", "StitchConfig", "fit_stitch", "fraction_unexplained", "pick_layer", "stitch_losses", "svcca"]
