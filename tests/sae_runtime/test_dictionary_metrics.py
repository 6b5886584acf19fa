"""Dictionary metrics (sae_runtime.metrics) against hand computations and second code paths."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sae_runtime.metrics.absorption import main_latents, token_absorption
from sae_runtime.metrics.fms import concept_fms, depth_accuracies, fms, _tree
from sae_runtime.metrics.ms import monosemanticity, summarise
from sae_runtime.metrics.reconstruction import reconstruction_metrics
from sae_runtime.saes import SaeConfig, build_sae


# -- MS ---------------------------------------------------------------------------------------
def _ms_pairwise(acts: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The reference's definition, looped over unordered pairs n < m."""
    a = acts.double()
    t = (a - a.min(0).values) / (a.max(0).values - a.min(0).values)
    e = emb.double() / emb.double().norm(dim=-1, keepdim=True)
    out = []
    for k in range(a.shape[1]):
        num = den = 0.0
        for n, m in itertools.combinations(range(a.shape[0]), 2):
            r = float(t[n, k] * t[m, k])
            num += r * float(e[n] @ e[m])
            den += r
        out.append(num / den if den else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def test_ms_linear_form_equals_pairwise_sum():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(23, 6, generator=g))
    emb = torch.randn(23, 5, generator=g)
    fast = monosemanticity(acts, emb, chunk=7)  # chunks that do not divide N
    slow = _ms_pairwise(acts, emb)
    assert torch.allclose(fast, slow, atol=1e-12)


def test_ms_by_hand():
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    acts = torch.tensor([[1.0, 0.0, 5.0], [1.0, 1.0, 5.0], [0.0, 2.0, 5.0]])
    ms = monosemanticity(acts, emb)
    # latent 0: only the pair (0, 1) has weight, and cos = 1; latent 1: only (1, 2), cos = 0.
    assert ms[0].item() == pytest.approx(1.0)
    assert ms[1].item() == pytest.approx(0.0)
    assert math.isnan(ms[2].item())  # constant latent: 0/0, counted as dead
    s = summarise(ms)
    assert (s.n_scored, s.n_dead, s.mean) == (2, 1, pytest.approx(0.5))


# -- FMS --------------------------------------------------------------------------------------
def test_depth_accuracies_read_from_node_counts():
    # XOR-like: the best stump gets 3/4 right, depth 2 all of them.
    z = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]).numpy()
    y = [0, 0, 1, 0]
    tree = _tree(z, y, None)
    assert depth_accuracies(tree) == [0.75, 1.0]
    part = concept_fms(z, y, cuts=1)
    assert part.acc_0 == 0.75 and part.fms_global == pytest.approx(0.75)


def test_fms_by_hand():
    y = torch.tensor([1] * 5 + [0] * 5)
    f1 = y.clone().float()
    f1[0], f1[5] = 0.0, 1.0  # 8 of 10 right
    z = torch.stack([y.float(), f1, torch.zeros(10)], dim=1)
    part = concept_fms(z, y, "c", cuts=5)
    assert part.acc_0 == 1.0 and part.fms_global == 1.0  # one split is a pure tree
    assert part.root_features[:2] == (0, 1)
    assert part.acc_cuts[0] == pytest.approx(0.8)  # feature 0 zeroed: feature 1's stump
    assert part.acc_cuts[1] == pytest.approx(0.5)  # both zeroed: nothing left
    assert part.local(1) == pytest.approx(0.4)
    assert part.fms(1) == pytest.approx(1.0 * (0.4 + 1.0) / 2)
    assert part.fms(5) == pytest.approx(1.0 * (1.0 + 1.0) / 2)


def test_fms_averages_concepts_on_balanced_rows():
    g = torch.Generator().manual_seed(1)
    lat = torch.rand(200, 4, generator=g)
    yes = torch.zeros(200, dtype=torch.bool)
    yes[:30] = True
    lat[:30, 2] += 2.0  # latent 2 alone separates the concept
    report = fms(lat, {"a": yes, "rare": torch.zeros(200, dtype=torch.bool)})
    assert [c.concept for c in report.per_concept] == ["a"]  # no positives: skipped
    c = report.per_concept[0]
    assert c.n == 60 and c.acc_0 == 1.0 and c.root_features[0] == 2
    assert report.fms_at_1 == pytest.approx(c.fms(1)) and report.fms_at_5 == pytest.approx(c.fms(5))


# -- absorption -------------------------------------------------------------------------------
DEC = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # latent 0 = the parent's main latent
PROBE = torch.tensor([3.0, 0.0])  # direction e0 (not unit: the metric normalises it)


@pytest.mark.parametrize(
    "x, a, frac, full",
    [
        ([2.0, 0.0], [2.0, 0.0, 0.0], 0.0, False),  # the main latent carries all of P
        ([1.6, 1.2], [0.0, 2.0, 0.0], 1.0, True),  # main silent, latent 1 carries P: full absorption
        ([2.0, 0.6], [1.0, 1.0, 0.0], 0.8 / 1.8, False),  # M = 1, S = 0.8, A = min(S, P - M) = 0.8
        ([2.0, 0.0], [1.0, 0.5, 0.0], 0.0, False),  # S / P = 0.2 < 0.4
        ([0.0, 2.0], [0.0, 0.0, 2.0], 0.0, False),  # P = 0: nothing to absorb
    ],
)
def test_token_absorption_by_hand(x, a, frac, full):
    r = token_absorption(torch.tensor(x), torch.tensor(a), DEC, PROBE, [0])
    assert r.fraction == pytest.approx(frac)
    assert r.full is full


def test_main_latents_finds_the_separating_latent():
    g = torch.Generator().manual_seed(2)
    y = torch.rand(600, generator=g) < 0.3
    lat = torch.rand(600, 8, generator=g)
    lat[:, 5] = y.float() * (1 + torch.rand(600, generator=g))
    main, f1s = main_latents(lat[:500], y[:500], lat[500:], y[500:])
    assert main == [5] and f1s[0] == pytest.approx(1.0)


# -- reconstruction ---------------------------------------------------------------------------
def test_reconstruction_metrics_by_hand():
    sae = build_sae(SaeConfig(architecture="standard", d_in=2, d_sae=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -1.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    m = reconstruction_metrics(sae, x)
    # f = relu(x): latents [[1, 0, 0], [2, 0.5, 0]]; error [[0, -1], [0, 0]]; variance 1.625.
    assert m.l0 == 1.5
    assert m.fvu == pytest.approx(1 / 1.625)
    assert m.dead_share == pytest.approx(1 / 3) and m.dense_share == pytest.approx(2 / 3)
    assert m.loss_recovered is None and m.n_tokens == 2


def test_ms_single_firing_input_is_nan_not_inf():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 7, generator=g)
    acts = torch.zeros(50, 2)
    acts[17, 0] = 3.3  # one input off the minimum: no pair has weight
    acts[:, 1] = torch.rand(50, generator=g)
    ms = monosemanticity(acts, emb)
    assert math.isnan(ms[0].item()) and math.isnan(_ms_pairwise(acts, emb)[0].item())
    assert ms[1].item() == pytest.approx(_ms_pairwise(acts, emb)[1].item())
