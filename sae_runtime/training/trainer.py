"""SAE trainer: topk, batchtopk, jumprelu and standard (L1) SAEs on stored activations.

Shared recipe: Adam; decoder rows kept at unit norm (the gradient component parallel to each row
is removed before the step, rows renormalised after it); b_dec initialised at the data mean,
W_enc at W_dec^T; per-latent "tokens since last fired" counters give the dead fraction.

Inputs are scaled by a constant ``s`` so that E||s x||^2 = d_in (SAELens
``expected_average_only_in``), which makes the sparsity coefficients transferable across models.
Exporting folds ``s`` into the weights without touching the unit-norm decoder: pre-acts and
latents are divided by ``s`` (b_enc/s, b_dec/s, threshold/s), which commutes with relu, top-k and
thresholds, so the exported SAE reads raw activations and reconstructs exactly what the trainer
does.

Per architecture (training loss = ||x - x_hat||^2 summed over d_in, mean over rows, plus):
- ``standard``: f = relu(h); + l1_coeff * sum_i f_i ||W_dec[i]||.
- ``topk``: f = top-k of relu(h) per row; + aux_coeff * aux-k loss (the top ``aux_k`` dead latents
  reconstruct the residual x - x_hat, normalised by the residual's variance; Gao et al. 2024).
- ``batchtopk``: keep the k * B largest relu(h) over the whole batch; the same aux-k loss; a global
  threshold tracks (EMA) the smallest kept activation. Inference and export: jumprelu with that
  threshold for every latent.
- ``jumprelu``: f = h * H(h - theta), theta = exp(log_theta) per latent; + l0_coeff * sum_i
  H(h_i - theta_i). H has zero derivative, so theta learns through the straight-through
  pseudo-derivative with a rectangle kernel of width ``bandwidth`` (Rajamanoharan et al. 2024):
  d f / d theta = -(theta / eps) K((h - theta) / eps), d H / d theta = -(1 / eps) K(...).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_runtime.errors import InvalidArgument
from sae_runtime.saes import Sae, SaeConfig, build_sae
from sae_runtime.training.activations import ActivationStore
from sae_runtime.training.evaluation import LossRecovered, fvu, l0

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. Coefficients apply to inputs normalised to E||x||^2 = d_in."""

    architecture: str = "topk"
    d_sae: int = 512
    k: int = 16  # topk / batchtopk: latents per row (batchtopk: on average)
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last part of training
    l1_coeff: float = 5.0  # standard
    l0_coeff: float = 1.0  # jumprelu
    bandwidth: float = 0.05  # jumprelu pseudo-derivative kernel width
    init_threshold: float = 0.1  # jumprelu initial theta
    aux_k: int | None = None  # topk/batchtopk: dead latents used by the aux loss (default 2k)
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 100_000  # a latent silent for this many rows counts as dead
    threshold_momentum: float = 0.99  # batchtopk: EMA of the smallest kept activation
    normalize: bool = True
    seed: int = 0
    log_every: int = 50

    def check(self, d_in: int) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InvalidArgument(f"unknown architecture {self.architecture!r} (use {ARCHITECTURES})", field="architecture")
        if self.d_sae < 1 or d_in < 1:
            raise InvalidArgument("d_sae and d_in must be >= 1", field="d_sae")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise InvalidArgument(f"k must be in [1, d_sae={self.d_sae}]", field="k")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InvalidArgument("steps, batch_size and lr must be positive", field="steps")


@dataclass(frozen=True)
class SaeMetrics:
    l0: float  # mean nonzero latents per row
    fvu: float  # fraction of variance unexplained
    dead_fraction: float  # latents silent for dead_after_tokens rows (or never fired, if fewer seen)


@dataclass
class TrainReport:
    config: TrainConfig
    steps: int
    tokens: int
    normalization_scale: float
    initial: SaeMetrics
    final: SaeMetrics
    history: list[dict[str, float]] = field(default_factory=list)
    loss_recovered: LossRecovered | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _JumpReLU(torch.autograd.Function):
    """h * H(h - theta) with the straight-through pseudo-gradient for theta."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        h, theta = ctx.saved_tensors
        kernel = ((h - theta).abs() < ctx.eps / 2).to(grad.dtype) / ctx.eps
        grad_theta = (-theta * kernel * grad).reshape(-1, theta.shape[-1]).sum(0)
        return grad * (h > theta), grad_theta, None


class _Step(torch.autograd.Function):
    """H(h - theta); gradient only for theta, through the rectangle kernel."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        h, theta = ctx.saved_tensors
        kernel = ((h - theta).abs() < ctx.eps / 2).to(grad.dtype) / ctx.eps
        return None, (-kernel * grad).reshape(-1, theta.shape[-1]).sum(0), None


class TrainableSae(nn.Module):
    """The training-time SAE in normalised space. Parameter names follow SAELens."""

    def __init__(self, cfg: TrainConfig, d_in: int, generator: torch.Generator) -> None:
        super().__init__()
        self.cfg = cfg
        w_dec = torch.randn(cfg.d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))
        #: batchtopk global threshold (normalised space); negative until the first training batch.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def pre_acts(self, x_n: Tensor) -> Tensor:
        return (x_n - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x_n: Tensor, train: bool = False) -> tuple[Tensor, Tensor]:
        """(latents f (N, d_sae), pre-acts h (N, d_sae)) of normalised inputs x_n (N, d_in)."""
        arch = self.cfg.architecture
        h = self.pre_acts(x_n)
        if arch == "standard":
            return torch.relu(h), h
        if arch == "topk":
            top = h.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values)), h
        if arch == "jumprelu":
            theta = self.log_threshold.exp()
            return (_JumpReLU.apply(h, theta, self.cfg.bandwidth) if train else torch.relu(h) * (h > theta)), h
        # batchtopk
        if train:
            r = torch.relu(h)
            flat = r.flatten()
            top = flat.topk(min(self.cfg.k * h.shape[0], flat.numel()))
            f = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(h)
            kept = top.values.detach()[top.values.detach() > 0]
            if kept.numel():
                m = float(kept.min())
                t = float(self.threshold)
                self.threshold.fill_(m if t < 0 else self.cfg.threshold_momentum * t + (1 - self.cfg.threshold_momentum) * m)
            return f, h
        return torch.relu(h) * (h > self.threshold.clamp_min(0)), h

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec


class SaeTrainer:
    """Holds a TrainableSae, its optimiser and dead-latent counters; one :meth:`step` per batch."""

    def __init__(self, cfg: TrainConfig, d_in: int, *, scale: float = 1.0, init_batch: Tensor | None = None) -> None:
        cfg.check(d_in)
        self.cfg = cfg
        self.d_in = d_in
        self.scale = float(scale)
        g = torch.Generator().manual_seed(cfg.seed)
        self.sae = TrainableSae(cfg, d_in, g)
        if init_batch is not None:
            with torch.no_grad():
                self.sae.b_dec.copy_((init_batch.float() * self.scale).mean(0))
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr)
        self.tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
        self.tokens_seen = 0
        self.steps_done = 0
        self.aux_k = cfg.aux_k if cfg.aux_k is not None else min(2 * cfg.k, cfg.d_sae)

    # -- inference path (raw activations in, export-scale latents out) --------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Latents (N, d_sae) of raw activations, on the scale of the exported SAE (f_n / s)."""
        with torch.no_grad():
            return self.sae.encode(x.float() * self.scale)[0] / self.scale

    def reconstruct(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.sae.decode(self.sae.encode(x.float() * self.scale)[0]) / self.scale

    def dead_mask(self) -> Tensor:
        """Latents silent for dead_after_tokens rows; before that many rows, those never fired."""
        limit = min(self.cfg.dead_after_tokens, max(self.tokens_seen, 1))
        return self.tokens_since_fired >= limit

    def evaluate(self, x: Tensor, chunk: int = 4096) -> SaeMetrics:
        fs, xh = [], []
        for i in range(0, x.shape[0], chunk):
            fs.append(self.encode(x[i : i + chunk]))
            xh.append(self.sae.decode(fs[-1] * self.scale).detach() / self.scale)
        f, x_hat = torch.cat(fs), torch.cat(xh)
        return SaeMetrics(l0=l0(f), fvu=fvu(x.float(), x_hat), dead_fraction=float(self.dead_mask().float().mean()))

    # -- training ---------------------------------------------------------------------------
    def _aux_loss(self, h: Tensor, residual: Tensor) -> Tensor | None:
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.tokens_seen == 0:
            return None
        k_aux = min(self.aux_k, n_dead)
        masked = torch.where(dead, h, torch.full_like(h, float("-inf")))
        top = masked.topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
        e_hat = f_aux @ self.sae.W_dec
        var = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        if float(var) <= 0:
            return None
        return (e_hat - residual).pow(2).sum(-1).mean() / var

    def _lr(self) -> float:
        decay_start = self.cfg.steps * (1 - self.cfg.lr_decay_fraction)
        if self.steps_done < decay_start or self.cfg.lr_decay_fraction <= 0:
            return self.cfg.lr
        return self.cfg.lr * max(0.0, (self.cfg.steps - self.steps_done) / (self.cfg.steps - decay_start))

    def step(self, x: Tensor) -> dict[str, float]:
        """One optimiser step on raw activations x (B, d_in); returns the step's losses and L0."""
        cfg, sae = self.cfg, self.sae
        x_n = x.float() * self.scale
        f, h = sae.encode(x_n, train=True)
        x_hat = sae.decode(f)
        mse = (x_hat - x_n).pow(2).sum(-1).mean()
        loss = mse
        logs = {"mse": float(mse.detach())}
        if cfg.architecture == "standard":
            sparsity = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
            loss = loss + cfg.l1_coeff * sparsity
            logs["l1"] = float(sparsity.detach())
        elif cfg.architecture == "jumprelu":
            sparsity = _Step.apply(h, sae.log_threshold.exp(), cfg.bandwidth).sum(-1).mean()
            loss = loss + cfg.l0_coeff * sparsity
        else:
            aux = self._aux_loss(h, (x_n - x_hat).detach())
            if aux is not None:
                loss = loss + cfg.aux_coeff * aux
                logs["aux"] = float(aux.detach())
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = sae.W_dec, sae.W_dec.grad
            if g is not None:
                g -= (g * w).sum(-1, keepdim=True) * w  # rows are unit norm: drop the radial part
        self.optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            fired = (f > 0).any(0)
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        self.tokens_seen += x.shape[0]
        self.steps_done += 1
        logs.update(loss=float(loss.detach()), l0=l0(f.detach()))
        return logs

    # -- export -----------------------------------------------------------------------------
    def to_sae(self, hook_name: str | None = None, model_name: str | None = None) -> Sae:
        """The trained SAE as a project Sae (batchtopk becomes jumprelu with its global threshold)."""
        cfg, s, t = self.cfg, self.scale, self.sae
        arch = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
        meta = {"trained_architecture": cfg.architecture, "training_steps": self.steps_done, "training_tokens": self.tokens_seen}
        if cfg.architecture in ("topk", "batchtopk"):
            meta["k"] = cfg.k
        sae_cfg = SaeConfig(
            architecture=arch,
            d_in=self.d_in,
            d_sae=cfg.d_sae,
            k=cfg.k if arch == "topk" else None,
            hook_name=hook_name,
            model_name=model_name,
            metadata=meta,
        )
        sae = build_sae(sae_cfg)
        with torch.no_grad():
            sae.W_enc.copy_(t.W_enc)
            sae.W_dec.copy_(t.W_dec)
            sae.b_enc.copy_(t.b_enc / s)
            sae.b_dec.copy_(t.b_dec / s)
            if cfg.architecture == "jumprelu":
                sae.threshold.copy_(t.log_threshold.exp() / s)
            elif cfg.architecture == "batchtopk":
                sae.threshold.fill_(float(t.threshold.clamp_min(0)) / s)
        return sae.eval()


def normalization_scale(x: Tensor) -> float:
    """s with E||s x||^2 = d_in for rows x (N, d_in)."""
    mean_sq = float(x.float().pow(2).sum(-1).mean())
    return math.sqrt(x.shape[-1] / mean_sq) if mean_sq > 0 else 1.0


@dataclass
class TrainResult:
    sae: Sae
    report: TrainReport
    trainer: SaeTrainer


def _as_store(acts: ActivationStore | Tensor) -> ActivationStore:
    return acts if isinstance(acts, ActivationStore) else ActivationStore.from_tensor(acts)


def train_sae(
    acts: ActivationStore | Tensor,
    cfg: TrainConfig,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    eval_acts: Tensor | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train an SAE on ``acts`` (a store or rows (N, d_in)) for ``cfg.steps`` batches (epochs loop).

    Metrics are measured on ``eval_acts`` (default: up to 8192 rows of the training data) before
    and after training; ``report.history`` logs the training losses every ``log_every`` steps.
    """
    store = _as_store(acts)
    if store.n_tokens == 0:
        raise InvalidArgument("no activations to train on", field="acts")
    probe_rows = next(store.batches(min(8192, store.n_tokens), shuffle=True, seed=cfg.seed))
    if eval_acts is None:
        eval_acts = probe_rows
    scale = normalization_scale(probe_rows) if cfg.normalize else 1.0
    trainer = SaeTrainer(cfg, store.d_in, scale=scale, init_batch=probe_rows)
    initial = trainer.evaluate(eval_acts)
    history: list[dict[str, float]] = []
    batches: Iterator[Tensor] = store.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + 1, loop=True)
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.architecture}", disable=not progress, unit="step")
    for step in bar:
        logs = trainer.step(next(batches))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logs["step"] = step + 1
            logs["dead_fraction"] = float(trainer.dead_mask().float().mean())
            history.append(logs)
            bar.set_postfix(mse=f"{logs['mse']:.3g}", l0=f"{logs['l0']:.1f}")
    final = trainer.evaluate(eval_acts)
    report = TrainReport(cfg, trainer.steps_done, trainer.tokens_seen, scale, initial, final, history)
    return TrainResult(trainer.to_sae(hook_name or store.hook_name, model_name or store.model_name), report, trainer)
