"""RiskProbe: sparse fit on synthetic pooled latents, scoring, contributions, files, mitigation, AUROC."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit
from sae_runtime.risk import (
    POOLS,
    PooledStats,
    ProbeLayout,
    RiskProbe,
    auroc,
    mitigation_edits,
    pool_latents,
    stack_pooled,
)
from sae_runtime.saes import SaeConfig, build_sae
from sae_runtime.training.logistic import stratified_split

LAYOUT = ProbeLayout((("res", 24), ("mlp", 16)))
SIGNAL = ("mlp", 5)  # the latent the label is a function of


def _sequence(g: torch.Generator, n_prompt: int, n_gen: int) -> dict[str, torch.Tensor]:
    """Token-level sparse nonnegative latents for each SAE, shape (T, d_sae)."""
    t = n_prompt + n_gen
    out = {}
    for name, d in LAYOUT.saes:
        fires = torch.rand(t, d, generator=g) < 0.2
        out[name] = fires * torch.rand(t, d, generator=g) * 3
    return out


@pytest.fixture(scope="module")
def dataset():
    """600 sequences; label = 1 iff latent mlp/5 is active on more than a fifth of prompt tokens."""
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for _ in range(600):
        n_prompt, n_gen = int(torch.randint(4, 12, (1,), generator=g)), int(torch.randint(0, 8, (1,), generator=g))
        lat = _sequence(g, n_prompt, n_gen)
        rate = float(torch.rand((), generator=g))
        sig = torch.rand(n_prompt, generator=g) < rate
        lat["mlp"][:n_prompt, SIGNAL[1]] = sig * (1.0 + torch.rand(n_prompt, generator=g))
        labels.append(int(sig.float().mean() > 0.45))
        rows.append({name: pool_latents(x, n_prompt) for name, x in lat.items()})
    y = torch.tensor(labels)
    feats = LAYOUT.build(stack_pooled(rows), "final")
    train, test = stratified_split(y, 0.3, seed=1)
    return rows, feats, y, train, test


@pytest.fixture(scope="module")
def probe(dataset):
    rows, feats, y, train, _ = dataset
    return RiskProbe.fit(feats[train], y[train], LAYOUT, l1=0.03, latent_labels={"mlp": {"concept:signal": SIGNAL[1]}})


def _hand_features(pooled: dict[str, PooledStats], head: str) -> torch.Tensor:
    pools = POOLS[:2] if head == "prompt" else POOLS
    parts = []
    for pool in pools:
        for name, d in LAYOUT.saes:
            v = getattr(pooled[name], pool)
            parts.append(torch.zeros(d) if v is None else v)
    return torch.cat(parts)


def test_pool_latents_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0], [2.0, 1.0], [4.0, 0.0]])
    p = pool_latents(x, n_prompt=2)
    torch.testing.assert_close(p.prompt_mean, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(p.prompt_max, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(p.gen_mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(p.gen_max, torch.tensor([4.0, 5.0]))
    empty = pool_latents(x[:2], n_prompt=2)  # nothing generated yet
    assert empty.gen_mean.abs().sum() == 0 and empty.gen_max.abs().sum() == 0


def test_probe_picks_the_signal_latent_and_is_sparse(probe):
    for head in ("prompt", "final"):
        w = probe.latent_weights(head)
        assert LAYOUT.latent_owner(int(w.abs().argmax())) == SIGNAL
        coef = probe.prompt_coef if head == "prompt" else probe.final_coef
        assert (coef == 0).float().mean() >= 0.9, f"{head} head not sparse: {(coef != 0).sum()} nonzero"
    assert probe.top_risk_latents(1) == [SIGNAL]
    assert probe.meta["converged"]


def test_probe_auroc_on_held_out(dataset, probe):
    _, feats, y, _, test = dataset
    n_prompt = LAYOUT.n_features("prompt")
    final = auroc(probe.predict_proba(feats[test], "final"), y[test])
    prompt = auroc(probe.predict_proba(feats[test][:, :n_prompt], "prompt"), y[test])
    assert final >= 0.95 and prompt >= 0.95, (final, prompt)


def test_contributions_sum_to_logit(dataset, probe):
    rows, _, _, _, test = dataset
    for i in test[:20].tolist():
        for head in ("prompt", "final"):
            coef = probe.prompt_coef if head == "prompt" else probe.final_coef
            b = probe.prompt_intercept if head == "prompt" else probe.final_intercept
            n = coef.numel()
            z = (_hand_features(rows[i], head) - probe.feature_mean[:n]) / probe.feature_std[:n]
            logit = float((z.double() * coef.double()).sum()) + b
            score = probe.score(rows[i], head, top_n=None)
            total = b + sum(c.contribution for c in score.contributions)
            assert total == pytest.approx(logit, abs=1e-5)
            assert score.probability == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
    top = probe.score_final(rows[int(test[0])], top_n=3).contributions
    assert len(top) <= 3
    assert [abs(c.contribution) for c in top] == sorted((abs(c.contribution) for c in top), reverse=True)
    signal = [c for c in probe.score_final(rows[int(test[0])], top_n=None).contributions if (c.sae, c.latent) == SIGNAL]
    assert signal and signal[0].label == "concept:signal"


def test_scoring_many_rows_at_once_matches_the_hand_logit_of_each(dataset, probe):
    rows, _, _, _, test = dataset
    idx = test[:25].tolist()
    for head in ("prompt", "final"):
        coef = probe.prompt_coef if head == "prompt" else probe.final_coef
        b = probe.prompt_intercept if head == "prompt" else probe.final_intercept
        n = coef.numel()
        batch = probe.score_many([rows[i] for i in idx], head, top_n=None)
        top3 = probe.score_many([rows[i] for i in idx], head, top_n=3)
        for i, score, short in zip(idx, batch, top3):
            z = (_hand_features(rows[i], head) - probe.feature_mean[:n]) / probe.feature_std[:n]
            logit = float((z.double() * coef.double()).sum()) + b
            assert b + sum(c.contribution for c in score.contributions) == pytest.approx(logit, abs=1e-5)
            assert score.probability == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
            assert short.contributions == score.contributions[:3]
    assert probe.score_many([], "final") == []


def test_prompt_score_ignores_generated_pools(dataset, probe):
    rows, *_ = dataset
    r = rows[0]
    noisy = {k: PooledStats(v.prompt_mean, v.prompt_max, v.gen_mean * 0 + 7, v.gen_max * 0 + 9) for k, v in r.items()}
    assert probe.score_prompt(r).probability == probe.score_prompt(noisy).probability


def test_save_load_round_trip(tmp_path, dataset, probe):
    rows, feats, _, _, test = dataset
    probe.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["risk_probe.json", "risk_probe.safetensors"]
    loaded = RiskProbe.load(tmp_path / "p")
    assert loaded.layout == probe.layout and loaded.latent_labels == probe.latent_labels
    assert torch.equal(loaded.predict_proba(feats[test]), probe.predict_proba(feats[test]))
    for i in test[:10].tolist():
        assert loaded.score_prompt(rows[i], top_n=None) == probe.score_prompt(rows[i], top_n=None)
        assert loaded.score_final(rows[i], top_n=None) == probe.score_final(rows[i], top_n=None)


def test_load_rejects_bad_files(tmp_path, probe):
    d = probe.save(tmp_path / "p")
    with pytest.raises(FormatError) as err:
        RiskProbe.load(tmp_path / "missing")
    assert "risk_probe.json" in str(err.value.field)
    cfg = json.loads((d / "risk_probe.json").read_text())
    cfg["saes"][0]["d_sae"] = 25
    (d / "risk_probe.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="feature_mean"):
        RiskProbe.load(d)


def test_score_validates_inputs(probe):
    with pytest.raises(InvalidArgument) as err:
        probe.score_prompt({"res": PooledStats(torch.zeros(24), torch.zeros(24))})
    assert err.value.field == "pooled.mlp"
    bad = {"res": PooledStats(torch.zeros(23), torch.zeros(23)), "mlp": PooledStats(torch.zeros(16), torch.zeros(16))}
    with pytest.raises(InvalidArgument):
        probe.score_prompt(bad)


def _probe_with_weights(weights: dict[tuple[str, int], float]) -> RiskProbe:
    layout = ProbeLayout((("a", 4), ("b", 3)))
    final = torch.zeros(layout.n_features("final"))
    for (sae, latent), w in weights.items():
        # spread the weight over two pools: gen_max block and prompt_mean block
        j = layout.latent_offset(sae) + latent
        final[j] = w / 2
        final[3 * layout.n_latents + j] = w / 2
    f = layout.n_features("final")
    return RiskProbe(layout, torch.zeros(f), torch.ones(f), torch.zeros(layout.n_features("prompt")), 0.0, final, 0.0)


def test_mitigation_edits_ablate_exactly_the_top_latents():
    probe = _probe_with_weights({("a", 2): 0.5, ("b", 0): 2.0, ("a", 0): 1.0, ("b", 2): -3.0, ("a", 3): 0.1})
    assert probe.top_risk_latents(3) == [("b", 0), ("a", 0), ("a", 2)]
    edits = mitigation_edits(probe, 3)
    assert edits == (
        LatentEdit(sae="a", op=EditOp.ABLATE, latents=(0, 2)),
        LatentEdit(sae="b", op=EditOp.ABLATE, latents=(0,)),
    )
    # never more than the positive ones; a negative-weight latent is never ablated
    assert sum(len(e.latents) for e in mitigation_edits(probe, 10)) == 4
    assert mitigation_edits(probe, 0) == ()
    # the edits validate against SAEs of the probe's sizes
    saes = {n: build_sae(SaeConfig("standard", d_in=8, d_sae=d)) for n, d in probe.layout.saes}
    plan = InterventionPlan(edits=edits).resolve(saes)
    assert {(e.sae, i) for e in plan.edits for i in e.latents} == {("b", 0), ("a", 0), ("a", 2)}


def test_mitigation_on_fitted_probe_lowers_risk(dataset, probe):
    rows, _, _, _, test = dataset
    edits = mitigation_edits(probe, 5)
    ablated = {(e.sae, i) for e in edits for i in e.latents}
    assert SIGNAL in ablated and len(ablated) <= 5
    # ablating the named latents (all pools zero) lowers the score of risky sequences
    lowered = 0
    risky = [i for i in test.tolist() if probe.score_final(rows[i]).probability > 0.5]
    for i in risky:
        edited = {}
        for name, stats in rows[i].items():
            mask = torch.ones(dict(LAYOUT.saes)[name])
            for sae, latent in ablated:
                if sae == name:
                    mask[latent] = 0
            edited[name] = PooledStats(*(getattr(stats, p) * mask for p in POOLS))
        lowered += probe.score_final(edited).probability < probe.score_final(rows[i]).probability
    assert risky and lowered == len(risky)


def _auroc_brute_force(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_counting(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40 + seed * 7
    scores = torch.randint(0, 6, (n,), generator=g).float()  # many ties
    labels = torch.rand(n, generator=g) < 0.4
    labels[0], labels[1] = True, False
    assert auroc(scores, labels) == pytest.approx(_auroc_brute_force(scores.tolist(), labels.tolist()), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    with pytest.raises(InvalidArgument):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(InvalidArgument):
        auroc([float("nan"), 0.2], [0, 1])
