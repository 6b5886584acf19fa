"""SAE architectures against hand-written formulas (float64 reference, written here, not the class's helpers)."""

from __future__ import annotations

import math

import pytest
import torch

from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.saes import SAE_REGISTRY, Sae, SaeConfig, build_sae

D_IN, D_SAE, K = 6, 10, 3
ALL_ARCHITECTURES = ("standard", "jumprelu", "batchtopk", "gated", "topk", "topk-sigmoid", "spade")


def make_sae(architecture: str, seed: int = 0, **cfg_changes) -> tuple[Sae, dict[str, torch.Tensor]]:
    """An SAE with random parameters, and those parameters as float64 tensors for the hand formulas."""
    cfg = SaeConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K, **cfg_changes)
    sae = build_sae(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name in ("threshold", "r_mag") else 1.0))
    return sae, {name: p.detach().double().clone() for name, p in sae.named_parameters()}


def inputs(seed: int = 1, n: int = 5) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def keep_top_k_rows(values: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the indices of the k largest values (python sort, independent of torch.topk)."""
    return [sorted(range(values.shape[1]), key=lambda j: -float(row[j]))[:k] for row in values]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


# -- registry ----------------------------------------------------------------------------------
def test_registry_holds_every_architecture_on_import():
    assert set(SAE_REGISTRY) == set(ALL_ARCHITECTURES) | {"ffkv"}  # ffkv is built from a model: test_dictionaries


def test_unknown_architecture_is_not_found():
    with pytest.raises(NotFound) as err:
        build_sae(SaeConfig(architecture="crosscoder", d_in=4, d_sae=8))
    assert err.value.field == "architecture" and "crosscoder" in err.value.message


@pytest.mark.parametrize("architecture", ["topk", "topk-sigmoid"])
@pytest.mark.parametrize("k", [None, 0, D_SAE + 1])
def test_topk_family_rejects_bad_k(architecture, k):
    with pytest.raises(InvalidArgument) as err:
        build_sae(SaeConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=k))
    assert err.value.field == "k"


# -- encode / decode against formulas --------------------------------------------------------------
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_standard(apply_b_dec):
    sae, p = make_sae("standard", apply_b_dec_to_input=apply_b_dec)
    x = inputs()
    xin = x.double() - p["b_dec"] if apply_b_dec else x.double()
    f = torch.clamp(torch.einsum("nd,df->nf", xin, p["W_enc"]) + p["b_enc"], min=0)
    close(sae.encode(x), f)
    close(sae.decode(f.float()), torch.einsum("nf,fd->nd", f, p["W_dec"]) + p["b_dec"])


def test_jumprelu_with_negative_and_positive_thresholds():
    sae, p = make_sae("jumprelu")
    x = inputs()
    h = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = torch.where(h > p["threshold"], torch.clamp(h, min=0), torch.zeros_like(h))
    assert (p["threshold"] < 0).any() and (p["threshold"] > 0).any()
    close(sae.encode(x), f)
    assert (f > 0).any() and (f == 0).any()


def test_batchtopk_uses_one_scalar_threshold():
    sae, p = make_sae("batchtopk")
    assert sae.threshold.shape == ()
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    x = inputs()
    h = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = torch.where(h > 0.5, h, torch.zeros_like(h))
    close(sae.encode(x), f)
    assert ((h > 0) & (h <= 0.5)).any(), "test data should include latents the threshold removes"


def test_gated():
    sae, p = make_sae("gated")
    assert "b_enc" not in dict(sae.named_parameters())
    x = inputs()
    xin = x.double() - p["b_dec"]
    gate = (xin @ p["W_enc"] + p["b_gate"]) > 0
    mag = torch.clamp(xin @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"], min=0)
    f = gate.double() * mag
    close(sae.encode(x), f)
    assert ((~gate) & (mag > 0)).any(), "the gate must matter in this test"


@pytest.mark.parametrize("rescale", [False, True])
def test_topk(rescale):
    sae, p = make_sae("topk", rescale_acts_by_decoder_norm=rescale)
    x = inputs()
    h = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    norms = p["W_dec"].pow(2).sum(1).sqrt()
    if rescale:
        h = h * norms
    f = torch.zeros_like(h)
    for row, keep in enumerate(keep_top_k_rows(h, K)):
        for j in keep:
            f[row, j] = max(float(h[row, j]), 0.0)
    close(sae.encode(x), f)
    assert ((sae.encode(x) != 0).sum(-1) <= K).all()
    recon = ((f / norms) if rescale else f) @ p["W_dec"] + p["b_dec"]
    close(sae.decode(f.float()), recon)
    # the contract steering relies on: decode(f) == f @ decoder_rows() + b_dec
    close(sae.decode(f.float()), f.float() @ sae.decoder_rows() + sae.b_dec)


def test_topk_sigmoid_standardises_and_destandardises():
    sae, p = make_sae("topk-sigmoid", n_concepts=4)
    x = inputs() + 3.0  # a non-zero mean per token
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    std = ((xd - mean) ** 2).mean(-1, keepdim=True).add(1e-5).sqrt()
    xn = (xd - mean) / std
    h = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = torch.zeros_like(h)
    for row, keep in enumerate(keep_top_k_rows(h, K)):
        for j in keep:
            f[row, j] = 1 / (1 + math.exp(-float(h[row, j])))
    close(sae.encode(x), f)
    recon = (f @ p["W_dec"] + p["b_dec"]) * std + mean
    close(sae(x), recon)
    x_n, norm = sae.normalize(x)
    close(norm.scale, std)
    close(norm.shift, mean)


def _sparsemax_by_bisection(z: list[float]) -> list[float]:
    """Projection onto the simplex: find tau with sum(max(z - tau, 0)) == 1 by bisection."""
    lo, hi = min(z) - 1.0, max(z)
    for _ in range(200):
        tau = (lo + hi) / 2
        if sum(max(v - tau, 0.0) for v in z) > 1:
            lo = tau
        else:
            hi = tau
    return [max(v - tau, 0.0) for v in z]


def test_spade_sparsemax_over_distances():
    sae, p = make_sae("spade")
    with torch.no_grad():
        sae.lambda_raw.fill_(-1.0)  # lambda ~ 0.31: a support of several latents
    lam = math.log1p(math.exp(-1.0))
    x = inputs()
    xin = x.double() - p["b_dec"]
    expected = []
    for row in xin:
        dist = [float(((row - p["W_enc"][:, i]) ** 2).sum()) for i in range(D_SAE)]
        expected.append(_sparsemax_by_bisection([-lam * d for d in dist]))
    f = sae.encode(x)
    close(f, torch.tensor(expected))
    close(f.sum(-1), torch.ones(f.shape[0]))
    assert ((f > 0).sum(-1) > 1).any()


def test_saelens_layer_norm_and_constant_norm_rescale():
    x = inputs() + 1.0
    xd = x.double()
    sae, p = make_sae("standard", normalize_activations="layer_norm")
    mu = xd.mean(-1, keepdim=True)
    std = torch.sqrt(((xd - mu) ** 2).sum(-1, keepdim=True) / (D_IN - 1))
    xn = (xd - mu) / (std + 1e-5)
    f = torch.clamp((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"], min=0)
    close(sae.encode(x), f)
    close(sae(x), (f @ p["W_dec"] + p["b_dec"]) * std + mu)

    sae, p = make_sae("standard", normalize_activations="constant_norm_rescale")
    coeff = math.sqrt(D_IN) / xd.norm(dim=-1, keepdim=True)
    f = torch.clamp((xd * coeff - p["b_dec"]) @ p["W_enc"] + p["b_enc"], min=0)
    close(sae.encode(x), f)
    close(sae(x), (f @ p["W_dec"] + p["b_dec"]) / coeff)


# -- selective encoding ------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_encode_selected_equals_full_encode_gathered(architecture, normalize):
    sae, _ = make_sae(architecture, normalize_activations=normalize)
    x = inputs(n=7).reshape(7, 1, D_IN).expand(7, 2, D_IN)  # leading dims (..., d_in)
    idx = torch.tensor([7, 0, 3, 3])
    full = sae.encode(x)
    torch.testing.assert_close(sae.encode_selected(x, idx), full[..., idx])


def test_selective_flag():
    selective = {name for name, cls in SAE_REGISTRY.items() if cls.selective}
    assert selective == {"standard", "jumprelu", "batchtopk", "gated"}


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "batchtopk", "gated"])
def test_selective_encode_reads_only_the_selected_columns(architecture):
    """O(k * d_in): the other encoder columns are never read (NaN there leaves the result finite)."""
    sae, _ = make_sae(architecture)
    x = inputs()
    idx = torch.tensor([2, 5])
    expected = sae.encode(x)[:, idx]
    others = torch.tensor([i for i in range(D_SAE) if i not in (2, 5)])
    with torch.no_grad():
        sae.W_enc[:, others] = float("nan")
    got = sae.encode_selected(x, idx)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_decode_is_affine_in_latents_through_decoder_rows(architecture):
    sae, _ = make_sae(architecture)
    f = torch.rand(4, D_SAE)
    torch.testing.assert_close(sae.decode_normalized(f), f @ sae.decoder_rows() + sae.b_dec)
    idx = torch.tensor([1, 4])
    torch.testing.assert_close(sae.decoder_rows(idx), sae.decoder_rows()[idx])
