"""FF key-value memories as a dictionary (Geva et al.; Ye et al., arXiv 2510.22332): architecture ``ffkv``.

An MLP computes FF(x) = sum_i m_i(x) v_i + b: m = act(gate x) * (up x) for gated MLPs (Llama,
Qwen, Mistral), m = act(up x) otherwise (GPT-2); v_i is column i of the down projection. So the
MLP's own neurons form a d_ff-latent dictionary that reads the MLP *input* and reconstructs its
*output*: a transcoder. Optional top-k keeps the k largest *signed* m_i per position (the fork's
``torch.topk`` on raw values), zero the rest.

It lives at the ``blocks.L.hook_mlp_io`` site, whose activation is cat(MLP input, MLP output)
(B, T, 2 d_model): ``d_in`` is 2 d_model, encode reads the first half, the decoder rows are
[0 | v_i] so an edit only moves the second half (the output), by exactly (m'_i - m_i) v_i when
k is None (with top-k, m_i is the top-k code: 0 for a latent outside the top k). Nothing is
stored on disk: :func:`ffkv_from_model` builds it from the model's weights, sharing their storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_runtime.errors import InvalidArgument
from sae_runtime.saes.base import Sae, SaeConfig, register
from sae_runtime.saes.topk import keep_topk
from sae_runtime.sites import HookSite, SiteKind, _text_config


def _activation(name: str):
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise InvalidArgument(f"unknown MLP activation {name!r}", field="ffkv.activation")
    return ACT2FN[name]


@register
class FfkvSae(Sae):
    """Parameters: W_enc (d_model, d_ff) up projection, b_enc; W_gate (d_ff, d_model), b_gate
    (gated); W_dec (d_ff, d_model) values; b_dec (2 d_model,) = [0 | down bias].

    ``cfg.metadata``: ``activation`` (a transformers ACT2FN name) and ``gated`` (bool).
    """

    architecture = "ffkv"

    def __init__(self, cfg: SaeConfig) -> None:
        if cfg.d_in % 2:
            raise InvalidArgument(f"ffkv reads cat(MLP input, output): d_in must be even, got {cfg.d_in}", field="d_in")
        if cfg.k is not None and not 1 <= cfg.k <= cfg.d_sae:
            raise InvalidArgument(f"ffkv k must be in [1, d_ff={cfg.d_sae}] or unset, got {cfg.k!r}", field="k")
        super().__init__(cfg.replace(apply_b_dec_to_input=False, normalize_activations="none"))
        d, dtype = cfg.d_in // 2, self.W_enc.dtype
        self.d_model = d
        self.k = cfg.k
        self.selective = cfg.k is None  # without top-k, m_i depends on key i alone
        self.gated = bool(cfg.metadata.get("gated", True))
        self.act = _activation(str(cfg.metadata.get("activation", "silu")))
        self.W_enc = nn.Parameter(torch.zeros(d, cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, d, dtype=dtype))
        if self.gated:
            self.W_gate = nn.Parameter(torch.zeros(cfg.d_sae, d, dtype=dtype))
            self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        #: The part of the site's activation this dictionary reconstructs: the MLP output.
        self.target_slice = slice(d, None)

    def neurons(self, x_n: Tensor) -> Tensor:
        """All signed neuron activations m (..., d_ff) of a site activation (..., 2 d_model)."""
        inp = x_n[..., : self.d_model]
        up = F.linear(inp, self.W_enc.T, self.b_enc)
        if not self.gated:
            return self.act(up)
        return self.act(F.linear(inp, self.W_gate, self.b_gate)) * up

    def encode_normalized(self, x_n: Tensor) -> Tensor:
        m = self.neurons(x_n)
        if self.k is None:
            return m
        values, indices = keep_topk(m, self.k)
        return torch.zeros_like(m).scatter_(-1, indices, values)

    def decoder_rows(self, idx: Tensor | None = None) -> Tensor:
        rows = self.W_dec if idx is None else self.W_dec.index_select(0, idx)
        return F.pad(rows, (self.d_model, 0))

    def decode_normalized(self, f: Tensor) -> Tensor:
        out = F.linear(f, self.W_dec.T, self.b_dec[self.d_model :])
        return torch.cat([torch.zeros_like(out), out], dim=-1)

    def value_vectors(self) -> Tensor:
        """The values v_i (d_ff, d_model): the decoder rows in MLP-output space."""
        return self.W_dec


def _weights(mlp: nn.Module) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor, Tensor | None, bool]:
    """(up (d_ff, d), up bias, gate, gate bias, down (d, d_ff), down bias, gated) of a HF MLP module."""
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        return u.weight, u.bias, g.weight, g.bias, dn.weight, dn.bias, True
    fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if fc is not None and proj is not None and type(fc).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return fc.weight.T, fc.bias, None, None, proj.weight.T, proj.bias, False
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("up_proj", "down_proj")):
        u, dn = mlp.up_proj, mlp.down_proj
        return u.weight, u.bias, None, None, dn.weight, dn.bias, False
    raise InvalidArgument(
        f"MLP {type(mlp).__name__} is neither gated (gate_proj/up_proj/down_proj) nor GPT-2 style (c_fc/c_proj)", field="ffkv"
    )


def ffkv_from_model(model: nn.Module, layer: int, k: int | None = None) -> FfkvSae:
    """The FF-KV dictionary of decoder layer ``layer``'s MLP, sharing the model's weight storage."""
    site = HookSite(SiteKind.MLP_IO, layer=layer)
    mlp = site.resolve(model)
    up, up_b, gate, gate_b, down, down_b, gated = _weights(mlp)
    text_cfg = _text_config(model.config)
    act = getattr(text_cfg, "hidden_act", None) or getattr(text_cfg, "activation_function", None) or "silu"
    d_ff, d = up.shape
    cfg = SaeConfig(
        architecture="ffkv", d_in=2 * d, d_sae=d_ff, k=k, dtype=str(up.dtype).removeprefix("torch."),
        hook_name=site.name, metadata={"activation": act, "gated": gated, "layer": layer},
    )  # fmt: skip
    with torch.device("meta"):
        sae = FfkvSae(cfg)
    shared = {"W_enc": up.detach().T, "W_dec": down.detach().T}
    if gated:
        shared["W_gate"] = gate.detach()
    biases = {"b_enc": up_b, "b_gate": gate_b}
    for name, b in biases.items():
        if name in dict(sae.named_parameters()):
            shared[name] = b.detach() if b is not None else torch.zeros(d_ff, dtype=up.dtype, device=up.device)
    b_dec = torch.zeros(2 * d, dtype=up.dtype, device=up.device)
    if down_b is not None:
        b_dec[d:] = down_b.detach()
    shared["b_dec"] = b_dec
    for name, t in shared.items():
        setattr(sae, name, nn.Parameter(t, requires_grad=False))
    return sae.eval()
