"""SpaDE training (Hindupur et al., arXiv 2503.01822; reference ``models.py``, ``functions/train_test.py``).

In the standardised space x' = s (x - mu) (mu the data mean, s with E||x'||^2 = d):

- z = sparsemax(-lambda ||x' - a_i||^2) = sparsemax(lambda (2 x'.a_i - ||a_i||^2)) (shift invariance),
  prototypes a_i the rows of A_e (M, d), lambda = softplus(lambda_raw) a scalar, initialised at 1/(2d);
- x_hat' = z A_d^T, no decoder bias, no norm constraint, A_d = A_e^T at init; A_e from data samples;
- loss = mean_batch sum_d (x' - x_hat')^2 + gamma mean_batch sum_i z_i ||x' - a_i||^2 (KDS's
  distance-weighted L1 on the encoder prototypes);
- Adam, cosine annealing from lr to lr_min over the run, gradient norm clipped at 1.

Export folds the standardisation into a :class:`~sae_runtime.saes.spade.SpadeSae` reading raw
activations: ||x' - a||^2 = s^2 ||x - mu - a/s||^2, so W_enc = A_e^T / s, b_dec = mu,
lambda' = lambda s^2 and W_dec = A_d^T / s (then x_hat = z W_dec + mu = x_hat' / s + mu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_runtime.saes import SaeConfig, build_sae
from sae_runtime.saes.spade import SpadeSae, sparsemax


@dataclass(frozen=True)
class SpadeTrainConfig:
    d_sae: int = 512
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 1e-2
    lr_min: float = 1e-4
    gamma: float = 0.1
    seed: int = 0
    log_every: int = 100


def _tau(z: Tensor, top: int) -> Tensor:
    """The sparsemax threshold (..., 1) of z, sorting only the ``top`` largest entries per row
    (the support is a prefix of them; rows whose support fills all ``top`` use a full sort)."""
    vals = z.topk(min(top, z.shape[-1]), dim=-1).values  # sorted, descending
    cumsum = vals.cumsum(-1)
    ranks = torch.arange(1, vals.shape[-1] + 1, dtype=z.dtype, device=z.device)
    support = (1 + ranks * vals > cumsum).sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
    full = (support.squeeze(-1) == vals.shape[-1]).nonzero().flatten()
    if full.numel() and vals.shape[-1] < z.shape[-1]:
        tau = tau.index_copy(0, full, _tau(z.index_select(0, full), z.shape[-1]))
    return tau


class _Sparsemax(torch.autograd.Function):
    """sparsemax with its closed-form Jacobian: on the support S, dz = g - mean_S(g); 0 elsewhere."""

    @staticmethod
    def forward(ctx, z: Tensor, top: int) -> Tensor:  # type: ignore[override]
        p = torch.clamp(z - _tau(z, top), min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        on = (p > 0).to(g.dtype)
        mean = (g * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True).clamp_min(1)
        return on * (g - mean), None


def sparsemax_top(z: Tensor, top: int = 64) -> Tensor:
    """sparsemax(z) over the last dim (rows of a 2-D z), exact, for training: a partial sort in the
    forward and the closed-form backward (equal to :func:`sae_runtime.saes.spade.sparsemax`)."""
    return _Sparsemax.apply(z, top)


class TrainableSpade(nn.Module):
    def __init__(self, prototypes: Tensor, d: int) -> None:
        super().__init__()
        self.A_e = nn.Parameter(prototypes.clone())
        self.A_d = nn.Parameter(prototypes.T.clone())
        target = 1.0 / (2 * d)
        self.lambda_raw = nn.Parameter(torch.tensor(math.log(math.expm1(target))))

    def encode(self, x: Tensor) -> Tensor:
        lam = F.softplus(self.lambda_raw)
        return sparsemax_top(lam * (2 * x @ self.A_e.T - self.A_e.pow(2).sum(-1)))

    def losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, distance-weighted L1, latents) for standardised rows x (B, d)."""
        z = self.encode(x)
        recon = (x - z @ self.A_d.T).pow(2).sum(-1).mean()
        sq = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ self.A_e.T + self.A_e.pow(2).sum(-1)).clamp_min(0)
        return recon, (z * sq).sum(-1).mean(), z


def train_spade(
    x: Tensor, cfg: SpadeTrainConfig = SpadeTrainConfig(), *, hook_name: str | None = None, model_name: str | None = None
) -> tuple[SpadeSae, list[dict[str, float]]]:
    """Train on rows x (N, d_in); returns the exported SAE (raw-activation space) and logged losses."""
    x = x.float()
    n, d = x.shape
    mu = x.mean(0)
    s = math.sqrt(d / float((x - mu).pow(2).sum(-1).mean()))
    xs = (x - mu) * s
    g = torch.Generator().manual_seed(cfg.seed)
    init = xs[torch.randperm(n, generator=g)[: cfg.d_sae]]
    if init.shape[0] < cfg.d_sae:
        init = torch.cat([init, torch.randn(cfg.d_sae - init.shape[0], d, generator=g)])
    model = TrainableSpade(init, d)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    history: list[dict[str, float]] = []
    for step in range(cfg.steps):
        rows = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        recon, reg, z = model.losses(xs[rows])
        loss = recon + cfg.gamma * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "recon": float(recon.detach()), "dist_l1": float(reg.detach()),
                            "l0": float((z.detach() > 0).sum(-1).float().mean()), "lambda": float(F.softplus(model.lambda_raw.detach()))})  # fmt: skip
    sae_cfg = SaeConfig(
        architecture="spade", d_in=d, d_sae=cfg.d_sae, hook_name=hook_name, model_name=model_name,
        metadata={"trained_architecture": "spade", "training_steps": cfg.steps, "gamma": cfg.gamma, "standardisation_scale": s},
    )  # fmt: skip
    sae = build_sae(sae_cfg)
    assert isinstance(sae, SpadeSae)
    with torch.no_grad():
        lam = float(F.softplus(model.lambda_raw)) * s * s
        sae.W_enc.copy_(model.A_e.T / s)
        sae.W_dec.copy_(model.A_d.T / s)
        sae.b_dec.copy_(mu)
        sae.lambda_raw.fill_(lam + math.log(-math.expm1(-lam)))  # softplus^-1(lam), stable for large lam
    sae.requires_grad_(False)
    return sae.eval(), history
