"""Model stitching: the joint fit, SVCCA, the collapsed SAE transfer (checked against an
independent encode of the down-mapped activations), files, the CLI and the config path."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_runtime.backends.spec import ModelSpec, SaeSpec
from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.demo.tiny_saes import random_probe, random_sae
from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.formats import load_sae, save_native
from sae_runtime.risk import PooledStats
from sae_runtime.saes.base import SaeConfig, build_sae
from sae_runtime.stitch import Stitch, StitchConfig, fit_stitch, pick_layer, svcca, transfer_direction, transfer_probe, transfer_sae
from sae_runtime.stitch.maps import stitch_losses
from sae_runtime.stitch.warmstart import load_into_trainer
from sae_runtime.training.trainer import SaeTrainer, TrainConfig

D_A, D_B, D_SAE = 8, 12, 24


def _stitch(seed=0, hook_a="blocks.1.hook_resid_post", hook_b="blocks.0.hook_resid_post"):
    g = torch.Generator().manual_seed(seed)
    return Stitch(
        torch.randn(D_A, D_B, generator=g) / D_A**0.5, torch.randn(D_B, generator=g) * 0.1,
        torch.randn(D_B, D_A, generator=g) / D_B**0.5, torch.randn(D_A, generator=g) * 0.1,
        hook_a=hook_a, hook_b=hook_b, model_a="a", model_b="b",
    )  # fmt: skip


def _sae(arch, seed=1, d_in=D_A, **cfg):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SaeConfig(architecture=arch, d_in=d_in, d_sae=D_SAE, hook_name="blocks.1.hook_resid_post", **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, D_SAE, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.2)
    sae.labels = {"color:red": 3, "animal:fox": 7}
    return sae


def _encode_by_hand(sae, x_a: np.ndarray) -> np.ndarray:
    """The original SAE's latents on A activations, from its tensors in float64 numpy."""
    w_enc, b_enc, w_dec, b_dec = (getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    h = (x_a - b_dec) @ w_enc + b_enc
    arch = sae.cfg.architecture
    if arch == "standard":
        return np.maximum(h, 0)
    if arch == "jumprelu":
        return np.maximum(h, 0) * (h > sae.threshold.detach().double().numpy())
    if sae.cfg.rescale_acts_by_decoder_norm:
        h = h * np.linalg.norm(w_dec, axis=1)
    out = np.zeros_like(h)
    top = np.argsort(-h, axis=1)[:, : sae.cfg.k]
    rows = np.arange(h.shape[0])[:, None]
    out[rows, top] = np.maximum(h[rows, top], 0)
    return out


@pytest.mark.parametrize("arch, cfg", [("standard", {}), ("jumprelu", {}), ("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True})])
def test_transferred_encode_on_b_equals_the_original_on_down_mapped_activations(arch, cfg, tmp_path):
    sae, stitch = _sae(arch, **cfg), _stitch()
    h_b = torch.randn(64, D_B, generator=torch.Generator().manual_seed(5))
    x_a = h_b.double().numpy() @ stitch.P_down.double().numpy() + stitch.b_down.double().numpy()  # T_down by hand
    expected = _encode_by_hand(sae, x_a)
    moved = load_sae(save_native(transfer_sae(sae, stitch), tmp_path / "t"))  # through the native files
    assert moved.d_in == D_B and moved.d_sae == D_SAE and moved.cfg.hook_name == "blocks.0.hook_resid_post"
    assert moved.labels == sae.labels
    got = moved.encode(h_b).detach().double().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert (got != 0).sum() > 0
    # decode is T_up of the original decode
    f = torch.as_tensor(expected, dtype=torch.float32)
    w_dec = sae.W_dec.detach().double().numpy()
    if cfg.get("rescale_acts_by_decoder_norm"):
        w_dec = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    x_hat_a = expected @ w_dec + sae.b_dec.detach().double().numpy()
    up = x_hat_a @ stitch.P_up.double().numpy() + stitch.b_up.double().numpy()
    np.testing.assert_allclose(moved.decode(f).detach().double().numpy(), up, atol=2e-5)


def test_transfer_refuses_what_is_not_affine_or_does_not_fit():
    stitch = _stitch()
    with pytest.raises(InvalidArgument) as err:
        transfer_sae(_sae("standard", normalize_activations="layer_norm"), stitch)
    assert err.value.field == "normalize_activations"
    with pytest.raises(InvalidArgument) as err:
        transfer_sae(_sae("standard", d_in=D_B), stitch)
    assert err.value.field == "stitch"
    gated = build_sae(SaeConfig(architecture="gated", d_in=D_A, d_sae=D_SAE))
    with pytest.raises(InvalidArgument) as err:
        transfer_sae(gated, stitch)
    assert err.value.field == "architecture"
    with pytest.raises(InvalidArgument) as err:
        transfer_sae(_sae("standard"), _stitch(hook_a="blocks.3.hook_resid_post"))
    assert err.value.field == "stitch.hook_a"


def test_joint_fit_recovers_an_affine_relation_and_its_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, D_A, generator=g) * 2 + 1
    m, c = torch.randn(D_A, D_B, generator=g), torch.randn(D_B, generator=g)
    b = a @ m + c
    stitch = fit_stitch(a[:2500], b[:2500], StitchConfig(steps=50), eval_a=a[2500:], eval_b=b[2500:], hook_a="x", hook_b="y")
    assert stitch.meta["held_out"] and stitch.meta["flops"] > 0
    assert stitch.meta["fvu_up"] < 1e-3 and stitch.meta["fvu_down"] < 1e-3
    assert stitch.meta["fvu_round_a"] < 1e-3 and stitch.meta["fvu_round_b"] < 1e-3
    torch.testing.assert_close(stitch.P_up, m, atol=2e-2, rtol=2e-2)
    # B lives in a D_A-dim affine subspace: T_down(T_up(a)) = a
    torch.testing.assert_close(stitch.down(stitch.up(a[:5])), a[:5], atol=5e-2, rtol=5e-2)


def test_stitch_loss_is_the_four_mse_terms():
    s = _stitch()
    params = {k: getattr(s, k) for k in ("P_up", "b_up", "P_down", "b_down")}
    a, b = torch.randn(7, D_A), torch.randn(7, D_B)
    an, bn = a.double().numpy(), b.double().numpy()
    pu, bu, pd, bd = (params[k].double().numpy() for k in ("P_up", "b_up", "P_down", "b_down"))
    up, down = an @ pu + bu, bn @ pd + bd
    by_hand = ((up - bn) ** 2).mean() + ((down - an) ** 2).mean() + 0.5 * (((up @ pd + bd) - an) ** 2).mean() + 0.5 * (((down @ pu + bu) - bn) ** 2).mean()
    assert float(stitch_losses(params, a, b, alpha=0.5)["total"]) == pytest.approx(by_hand, rel=1e-5)


def test_svcca_scores_linear_relatives_high_and_picks_them():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g)
    related = a @ torch.randn(6, 10, generator=g) + 3.0
    unrelated = torch.randn(500, 10, generator=g)
    assert svcca(a, related) == pytest.approx(1.0, abs=1e-6)
    assert svcca(a, unrelated) < 0.3
    best, scores = pick_layer(a, {"blocks.0.hook_resid_post": unrelated, "blocks.1.hook_resid_post": related})
    assert best == "blocks.1.hook_resid_post" and scores[best] > scores["blocks.0.hook_resid_post"]


def test_stitch_files_round_trip_and_bad_files_name_themselves(tmp_path):
    s = _stitch()
    s.meta = {"fvu_up": 0.25}
    loaded = Stitch.load(s.save(tmp_path / "s"))
    for k in ("P_up", "b_up", "P_down", "b_down"):
        assert torch.equal(getattr(loaded, k), getattr(s, k))
    assert (loaded.hook_a, loaded.hook_b, loaded.meta) == (s.hook_a, s.hook_b, {"fvu_up": 0.25})
    cfg = json.loads((tmp_path / "s" / "stitch.json").read_text())
    (tmp_path / "s" / "stitch.json").write_text(json.dumps(cfg | {"d_b": 99}))
    with pytest.raises(FormatError) as err:
        Stitch.load(tmp_path / "s")
    assert "stitch.json" in err.value.field
    (tmp_path / "s" / "stitch.safetensors").write_bytes(b"junk")
    with pytest.raises(FormatError) as err:
        Stitch.load(tmp_path / "s")
    assert "stitch.safetensors" in err.value.field


def test_directions_map_through_p_up_renormalised_and_the_probe_carries_over():
    s = _stitch()
    v = torch.randn(D_A)
    moved = transfer_direction(v, s)
    expected = v.double().numpy() @ s.P_up.double().numpy()
    np.testing.assert_allclose(moved.double().numpy(), expected / np.linalg.norm(expected) * float(v.norm()), rtol=1e-5)
    probe = random_probe("concepts", D_SAE, seed=3, labels={"color:red": 3})
    carried = transfer_probe(probe, s, renames={"concepts": "moved"})
    assert carried.layout.saes == (("moved", D_SAE),) and carried.latent_labels == {"moved": {"color:red": 3}}
    pooled = PooledStats(torch.rand(D_SAE), torch.rand(D_SAE))
    assert carried.score_prompt({"moved": pooled}).probability == probe.score_prompt({"concepts": pooled}).probability


def test_warm_start_loads_the_transferred_sae_into_the_trainer_exactly():
    moved = transfer_sae(_sae("standard"), _stitch())
    x = torch.randn(32, D_B) * 3
    trainer = SaeTrainer(TrainConfig(architecture="standard", d_sae=D_SAE, steps=1), D_B, scale=0.37)
    load_into_trainer(trainer, moved)
    # the trainer keeps unit-norm decoder rows: latent i is the transferred one times ||W_dec'[i]||
    norms = moved.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(trainer.encode(x), moved.encode(x).detach() * norms, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trainer.reconstruct(x), moved(x).detach(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stitch_models")
    a = build_tiny_causal_lm(root / "a", seed=0, hidden_size=32, num_layers=2, init_std=0.2)
    b = build_tiny_causal_lm(root / "b", seed=1, hidden_size=48, num_layers=3, init_std=0.2)
    texts = root / "texts.txt"
    words = [f"w{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    texts.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(60)))
    return root, a, b, texts


def test_cli_fits_picks_a_layer_and_transfers_an_sae_that_loads_on_b(two_models, tmp_path, capsys):
    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.types import EncodeRequest
    from sae_runtime.stitch.__main__ import cli

    root, a, b, texts = two_models
    assert cli(["fit", "--model-a", str(a), "--model-b", str(b), "--hook-a", "blocks.0.hook_resid_post", "--texts", str(texts), "--out", str(tmp_path / "st"), "--steps", "20"]) == 0
    stitch = Stitch.load(tmp_path / "st")
    assert stitch.hook_b in stitch.meta["svcca"] and len(stitch.meta["svcca"]) == 3
    assert stitch.meta["svcca"][stitch.hook_b] == max(stitch.meta["svcca"].values())
    sae_a = random_sae(32, 40, "blocks.0.hook_resid_post", seed=2, labels={"x": 1})
    save_native(sae_a, tmp_path / "sae_a")
    random_probe("sae_a", 40, seed=1).save(tmp_path / "probe_a")
    args = ["transfer", "--sae", str(tmp_path / "sae_a"), "--stitch", str(tmp_path / "st"), "--out", str(tmp_path / "sae_b"),
            "--probe", str(tmp_path / "probe_a"), "--probe-out", str(tmp_path / "probe_b")]  # fmt: skip
    assert cli(args) == 0
    # the service's path: ModelSpec -> from_spec, once with the written SAE, once with transfer at load time
    for spec_sae in (SaeSpec("sae_a", str(tmp_path / "sae_b")), SaeSpec("sae_a", str(tmp_path / "sae_a"), stitch=str(tmp_path / "st"))):
        backend = CausalLmBackend.from_spec(ModelSpec("b", "causal_lm", str(b), saes=(spec_sae,), risk_probe=str(tmp_path / "probe_b")))
        text = "w1 w2 w3 w4"
        out = backend.encode(EncodeRequest(text=text, saes=("sae_a",), top_k=40))
        # independent: B's hidden state at that layer via output_hidden_states, T_down by hand, A's SAE by hand
        layer = int(stitch.hook_b.split(".")[1])
        ids = backend.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h_b = backend.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        x_a = h_b.double().numpy() @ stitch.P_down.double().numpy() + stitch.b_down.double().numpy()
        expected = _encode_by_hand(sae_a, x_a)
        for pos, latents in enumerate(out.latents):
            got = {la.index: la.value for la in latents[0].before if la.value != 0}
            want = {int(i): float(expected[pos, i]) for i in np.nonzero(expected[pos])[0]}
            assert got.keys() == want.keys()
            for i in want:
                assert got[i] == pytest.approx(want[i], abs=1e-4)
        assert out.risk is not None


def test_config_transfer_entry_becomes_a_stitched_sae_spec(tmp_path):
    from services.config import parse_config

    cfg = parse_config({"models": [{"name": "b", "kind": "causal_lm", "path": "model_b",
                                    "saes": [{"name": "concepts", "transfer": {"sae": "a/sae", "stitch": "a_to_b"}}]}]})  # fmt: skip
    spec = cfg.models[0].to_spec(tmp_path)
    assert spec.saes[0].path == str((tmp_path / "a/sae").resolve()) and spec.saes[0].stitch == str((tmp_path / "a_to_b").resolve())
    with pytest.raises(Exception) as err:
        parse_config({"models": [{"name": "b", "kind": "causal_lm", "path": "m", "saes": [{"name": "c", "path": "x", "transfer": {"sae": "a", "stitch": "s"}}]}]})
    assert "transfer" in str(err.value)


MODELS = Path(__file__).resolve().parents[2] / "models"


def test_shipped_demo_b_holds_the_transfer_of_the_demo_sae_and_fits_the_budget():
    from sae_runtime.demo import stitch_demo
    from sae_runtime.demo.build import sae_corpus
    from sae_runtime.stitch.pipeline import collect

    files = [f for f in MODELS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    root = MODELS / stitch_demo.NAME
    manifest = json.loads((root / stitch_demo.MANIFEST).read_text())
    stitch = Stitch.load(root / stitch_demo.STITCH_DIR)
    assert stitch.hook_b == manifest["hook_b"] and stitch.meta["svcca"][stitch.hook_b] == max(stitch.meta["svcca"].values())
    backend = stitch_demo.load_backend_b(MODELS)
    moved, original = backend.saes[stitch_demo.SAE_NAME], load_sae(MODELS / "demo-lm" / "saes" / "concepts")
    assert moved.labels == original.labels and moved.d_in == backend.model.config.hidden_size != original.d_in
    h_b = collect(backend.model, backend.tokenizer, sae_corpus(8, seed=9_000), stitch.hook_b)
    x_a = torch.from_numpy(h_b.double().numpy() @ stitch.P_down.double().numpy() + stitch.b_down.double().numpy())
    with torch.no_grad():
        torch.testing.assert_close(moved.encode(h_b), original.encode(x_a.float()), atol=1e-3, rtol=1e-4)
