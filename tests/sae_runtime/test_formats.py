"""SAE file formats: files written here exactly as each project writes them, loaded through load_sae.

Every loaded SAE's encode/decode is compared with the original format's own formula evaluated on the
original tensors (float64), not with our classes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_runtime.errors import FormatError, InvalidArgument, NotFound
from sae_runtime.formats import detect_format, load_sae, save_native, save_saelens
from sae_runtime.saes import SaeConfig, build_sae

D_IN, D_SAE, K = 6, 10, 3
GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _reseed():
    """Each test draws the same tensors whatever ran before it."""
    GEN.manual_seed(0)


def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=GEN) * scale


def x_batch(n: int = 5, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def topk_relu(h: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries per row (python sort), relu them, zero the rest."""
    out = torch.zeros_like(h)
    for r, row in enumerate(h):
        for j in sorted(range(h.shape[1]), key=lambda j: -float(row[j]))[:k]:
            out[r, j] = max(float(row[j]), 0.0)
    return out


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def saelens_jumprelu(directory: Path, **cfg_extra) -> dict[str, torch.Tensor]:
    tensors = {"W_enc": rand(D_IN, D_SAE), "b_enc": rand(D_SAE), "W_dec": rand(D_SAE, D_IN),
               "b_dec": rand(D_IN), "threshold": rand(D_SAE, scale=0.3).abs()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "hook_head_index": None,
                        "prepend_bos": True, "context_size": 128, "neuronpedia_id": None,
                        "sae_lens_version": "6.5.0"}}
    cfg.update(cfg_extra)
    write_json(directory / "cfg.json", cfg)
    return {k: v.double() for k, v in tensors.items()}


def jumprelu_formula(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    h = (x.double() - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    return torch.clamp(h, min=0) * (h > t["threshold"])


# -- SAELens -----------------------------------------------------------------------------------
def test_saelens_v6_jumprelu(tmp_path):
    t = saelens_jumprelu(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert detect_format(tmp_path / "sae") == "saelens"
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.model_name == "tiny" and sae.cfg.metadata["context_size"] == 128
    x = x_batch()
    f = jumprelu_formula(x, t)
    close(sae.encode(x), f)
    close(sae.decode(f.float()), f @ t["W_dec"] + t["b_dec"])
    assert not sae.training


def test_saelens_pre_6_topk_layout(tmp_path):
    tensors = {"W_enc": rand(D_IN, D_SAE), "b_enc": rand(D_SAE), "W_dec": rand(D_SAE, D_IN), "b_dec": rand(D_IN)}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    write_json(tmp_path / "cfg.json", {
        "model_name": "gpt2", "hook_point": "blocks.4.hook_resid_pre", "hook_point_layer": 4, "d_in": D_IN,
        "d_sae": D_SAE, "dtype": "torch.float32", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True, "normalize_activations": False, "context_size": 64,
        "sae_lens_training_version": "3.13.0", "lr": 0.0004})
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name) == ("topk", K, "blocks.4.hook_resid_pre")
    assert sae.cfg.metadata["hook_layer"] == 4 and "lr" not in sae.cfg.metadata
    t = {k: v.double() for k, v in tensors.items()}
    x = x_batch()
    close(sae.encode(x), topk_relu((x.double() - t["b_dec"]) @ t["W_enc"] + t["b_enc"], K))


def test_saelens_gated(tmp_path):
    tensors = {"W_enc": rand(D_IN, D_SAE), "b_gate": rand(D_SAE), "b_mag": rand(D_SAE), "r_mag": rand(D_SAE) * 0.3,
               "W_dec": rand(D_SAE, D_IN), "b_dec": rand(D_IN)}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    write_json(tmp_path / "cfg.json", {"architecture": "gated", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                                      "apply_b_dec_to_input": True, "normalize_activations": "none",
                                      "metadata": {"hook_name": "blocks.0.hook_mlp_out"}})
    t = {k: v.double() for k, v in tensors.items()}
    x = x_batch()
    xin = x.double() - t["b_dec"]
    f = ((xin @ t["W_enc"] + t["b_gate"]) > 0) * torch.clamp(xin @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"], min=0)
    close(load_sae(tmp_path).encode(x), f)


def test_saelens_topk_rescale_by_decoder_norm(tmp_path):
    tensors = {"W_enc": rand(D_IN, D_SAE), "b_enc": rand(D_SAE), "W_dec": rand(D_SAE, D_IN) * 3, "b_dec": rand(D_IN)}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    write_json(tmp_path / "cfg.json", {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K,
                                      "rescale_acts_by_decoder_norm": True, "dtype": "float32",
                                      "metadata": {"sae_lens_version": "6.20.0"}})
    t = {k: v.double() for k, v in tensors.items()}
    norms = t["W_dec"].norm(dim=-1)
    x = x_batch()
    f = topk_relu(((x.double() - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms, K)
    sae = load_sae(tmp_path)
    close(sae.encode(x), f)
    close(sae.decode(f.float()), (f / norms) @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("source", ["activation_scaler", "cfg_key", "load_option"])
def test_saelens_expected_average_only_in_is_folded(tmp_path, source):
    s = 2.5
    extra = {"normalize_activations": "expected_average_only_in"}
    if source == "cfg_key":
        extra["norm_scaling_factor"] = s
    t = saelens_jumprelu(tmp_path, **extra)
    if source == "activation_scaler":
        write_json(tmp_path / "activation_scaler.json", {"scaling_factor": s})
    sae = load_sae(tmp_path, norm_scaling_factor=s if source == "load_option" else None)
    assert sae.cfg.normalize_activations == "none"
    x = x_batch()
    f = jumprelu_formula(x * s, t)  # the SAE was trained on x * s
    close(sae.encode(x), f)
    close(sae.decode(f.float()), (f @ t["W_dec"] + t["b_dec"]) / s)  # and its output is unscaled


def test_saelens_expected_average_without_factor_warns(tmp_path):
    saelens_jumprelu(tmp_path, normalize_activations="expected_average_only_in")
    with pytest.warns(UserWarning, match="no norm scaling factor"):
        sae = load_sae(tmp_path)
    assert sae.cfg.normalize_activations == "expected_average_only_in"


def test_saelens_transposed_decoder_is_fixed_with_a_warning(tmp_path):
    t = saelens_jumprelu(tmp_path)
    stored = {k: v.float() for k, v in t.items()}
    stored["W_dec"] = stored["W_dec"].T.contiguous()  # (d_in, d_sae), as some converters write it
    save_file(stored, str(tmp_path / "sae_weights.safetensors"))
    with pytest.warns(UserWarning, match="'W_dec' stored as"):
        sae = load_sae(tmp_path)
    f = jumprelu_formula(x_batch(), t)
    close(sae.decode(f.float()), f @ t["W_dec"] + t["b_dec"])


def test_saelens_labels_json_and_dtype_device_options(tmp_path):
    saelens_jumprelu(tmp_path)
    write_json(tmp_path / "labels.json", {"bridge": 4, "ocean": 0})
    sae = load_sae(tmp_path, dtype="bfloat16", device="cpu")
    assert sae.labels == {"bridge": 4, "ocean": 0}
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in sae.parameters())
    assert sae.cfg.dtype == "bfloat16"


# -- sparsify ----------------------------------------------------------------------------------
def write_sparsify(parent: Path, hookpoint: str = "layers.3", **cfg_extra) -> dict[str, torch.Tensor]:
    directory = parent / hookpoint
    directory.mkdir(parents=True)
    tensors = {"encoder.weight": rand(D_SAE, D_IN), "encoder.bias": rand(D_SAE), "W_dec": rand(D_SAE, D_IN),
               "b_dec": rand(D_IN)}
    save_file(tensors, str(directory / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(cfg_extra)
    write_json(directory / "cfg.json", cfg)
    return {k: v.double() for k, v in tensors.items()}


def test_sparsify_hookpoint_dir_and_parent_with_hookpoint(tmp_path):
    t = write_sparsify(tmp_path)
    write_sparsify(tmp_path, "layers.5")
    x = x_batch()
    expected = topk_relu((x.double() - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], K)
    for sae in (load_sae(tmp_path / "layers.3"), load_sae(tmp_path, hookpoint="layers.3")):
        assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name) == ("topk", K, "layers.3")
        close(sae.encode(x), expected)
        close(sae.decode(expected.float()), expected @ t["W_dec"] + t["b_dec"])
    assert detect_format(tmp_path / "layers.3") == "sparsify"
    with pytest.raises(FormatError, match="layers.3, layers.5"):
        load_sae(tmp_path)
    with pytest.raises(FormatError, match="'layers.9' not found"):
        load_sae(tmp_path, hookpoint="layers.9")


def test_sparsify_num_latents_zero_uses_expansion_factor_and_skip_is_refused(tmp_path):
    write_sparsify(tmp_path, num_latents=0, expansion_factor=D_SAE // 2, d_in=2)
    with pytest.raises(FormatError) as err:  # d_in 2 * 5 = 10 latents, but encoder.weight is (10, 6)
        load_sae(tmp_path / "layers.3")
    assert "'encoder.weight'" in err.value.message and err.value.field.endswith("sae.safetensors")

    write_sparsify(tmp_path, "layers.4", skip_connection=True)
    with pytest.raises(FormatError, match="W_skip"):
        load_sae(tmp_path / "layers.4")


# -- dictionary_learning ---------------------------------------------------------------------------
def write_dictionary_learning(directory: Path, dict_class: str, state: dict, **trainer_extra) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(OrderedDict(state), directory / "ae.pt")
    trainer = {"trainer_class": "X", "dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE,
               "layer": 2, "lm_name": "tiny-lm", "submodule_name": "resid_2", "lr": 1e-3}
    trainer.update(trainer_extra)
    write_json(directory / "config.json", {"trainer": trainer, "buffer": {"d_submodule": D_IN}})


def test_dictionary_learning_autoencoder_is_loaded_with_normalize_decoder(tmp_path):
    """AutoEncoder.from_pretrained(normalize_decoder=True), as load_dictionary calls it: latents on the
    unit-decoder scale (f * ||decoder column i||), decoding unchanged."""
    state = {"bias": rand(D_IN), "encoder.weight": rand(D_SAE, D_IN), "encoder.bias": rand(D_SAE),
             "decoder.weight": rand(D_IN, D_SAE) * 3}
    write_dictionary_learning(tmp_path, "AutoEncoder", state)
    t = {k: v.double() for k, v in state.items()}
    sae = load_sae(tmp_path)
    assert detect_format(tmp_path) == "dictionary_learning"
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.metadata["layer"]) == ("standard", "resid_2", 2)
    x = x_batch()
    norms = t["decoder.weight"].norm(dim=0)
    assert float(norms.min()) > 1.5  # far from unit norm: the fold is visible
    f = torch.clamp((x.double() - t["bias"]) @ t["encoder.weight"].T + t["encoder.bias"], min=0) * norms
    close(sae.encode(x), f)
    close(sae.decode(f.float()), (f / norms) @ t["decoder.weight"].T + t["bias"])
    close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_dictionary_learning_jumprelu_applies_no_norm_scaling(tmp_path):
    state = {"W_enc": rand(D_IN, D_SAE), "b_enc": rand(D_SAE), "W_dec": rand(D_SAE, D_IN) * 2,
             "b_dec": rand(D_IN), "threshold": rand(D_SAE, scale=0.3).abs()}
    write_dictionary_learning(tmp_path, "JumpReluAutoEncoder", state)
    t = {k: v.double() for k, v in state.items()}
    sae = load_sae(tmp_path)
    assert not sae.cfg.apply_b_dec_to_input
    # dictionary_learning (since January 2025): f = relu(h * (h > thr)); decode: f @ W_dec + b_dec
    x = x_batch()
    h = x.double() @ t["W_enc"] + t["b_enc"]
    f = torch.clamp(h * (h > t["threshold"]), min=0)
    close(sae.encode(x), f)
    close(sae.decode(f.float()), f @ t["W_dec"] + t["b_dec"])


def test_dictionary_learning_gated_applies_no_norm_scaling(tmp_path):
    """GatedAutoEncoder scales by decoder norms only with normalize_decoder=True, which load_dictionary
    does not pass."""
    state = {"decoder_bias": rand(D_IN), "encoder.weight": rand(D_SAE, D_IN), "r_mag": rand(D_SAE) * 0.3,
             "gate_bias": rand(D_SAE), "mag_bias": rand(D_SAE), "decoder.weight": rand(D_IN, D_SAE) * 2}
    write_dictionary_learning(tmp_path, "GatedAutoEncoder", state)
    t = {k: v.double() for k, v in state.items()}
    x = x_batch()
    x_enc = (x.double() - t["decoder_bias"]) @ t["encoder.weight"].T
    f = ((x_enc + t["gate_bias"]) > 0) * torch.clamp(t["r_mag"].exp() * x_enc + t["mag_bias"], min=0)
    sae = load_sae(tmp_path)
    close(sae.encode(x), f)
    close(sae.decode(f.float()), f @ t["decoder.weight"].T + t["decoder_bias"])


def test_dictionary_learning_topk(tmp_path):
    state = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(-1.0),
             "decoder.weight": rand(D_IN, D_SAE), "encoder.weight": rand(D_SAE, D_IN), "encoder.bias": rand(D_SAE),
             "b_dec": rand(D_IN)}
    write_dictionary_learning(tmp_path, "AutoEncoderTopK", state, k=K)
    t = {k: v.double() for k, v in state.items()}
    x = x_batch()
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", K)
    close(sae.encode(x), topk_relu((x.double() - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], K))


@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning_batchtopk_uses_global_threshold(tmp_path, dict_class):
    common = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.4)}
    if dict_class == "BatchTopKSAE":
        weights = {"decoder.weight": rand(D_IN, D_SAE), "encoder.weight": rand(D_SAE, D_IN),
                   "encoder.bias": rand(D_SAE), "b_dec": rand(D_IN)}
        enc_w, enc_b, dec_w = weights["encoder.weight"].T, weights["encoder.bias"], weights["decoder.weight"].T
    else:
        weights = {"group_sizes": torch.tensor([4, 6]), "W_enc": rand(D_IN, D_SAE), "b_enc": rand(D_SAE),
                   "W_dec": rand(D_SAE, D_IN), "b_dec": rand(D_IN)}
        enc_w, enc_b, dec_w = weights["W_enc"], weights["b_enc"], weights["W_dec"]
    write_dictionary_learning(tmp_path, dict_class, {**common, **weights})
    sae = load_sae(tmp_path)
    assert sae.cfg.architecture == "batchtopk" and sae.threshold.shape == ()
    x = x_batch()
    post_relu = torch.clamp((x.double() - weights["b_dec"].double()) @ enc_w.double() + enc_b.double(), min=0)
    f = post_relu * (post_relu > 0.4)
    close(sae.encode(x), f)
    close(sae.decode(f.float()), f @ dec_w.double() + weights["b_dec"].double())
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert sae.cfg.metadata["group_sizes"] == [4, 6]


def test_dictionary_learning_unknown_class_is_a_format_error(tmp_path):
    write_dictionary_learning(tmp_path, "CrossCoder", {"encoder.weight": rand(D_SAE, D_IN)})
    with pytest.raises(FormatError, match="CrossCoder") as err:
        load_sae(tmp_path)
    assert err.value.field.endswith("config.json")


# -- OpenAI-style TopK (sdxl-unbox) -------------------------------------------------------------------
def test_openai_topk_with_latent_statistics(tmp_path):
    directory = tmp_path / "unet.up_blocks.0.attentions.0_k3_hidden10_auxk4_bs4096_lr0.0001" / "final"
    directory.mkdir(parents=True)
    state = {"encoder.weight": rand(D_SAE, D_IN), "decoder.weight": rand(D_IN, D_SAE), "pre_bias": rand(D_IN),
             "latent_bias": rand(D_SAE), "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long)}
    write_json(directory / "config.json", {"n_dirs_local": D_SAE, "d_model": D_IN, "k": K, "auxk": 4,
                                           "dead_steps_threshold": 2441})
    torch.save({"state_dict": OrderedDict(state)}, directory / "state_dict.pth")
    mean, std = rand(D_SAE).abs(), rand(D_SAE).abs()
    torch.save(mean, directory / "mean.pt")
    torch.save(std, directory / "std.pt")

    assert detect_format(directory) == "openai_topk"
    sae = load_sae(directory)
    assert (sae.cfg.k, sae.cfg.hook_name) == (K, "unet.up_blocks.0.attentions.0")
    torch.testing.assert_close(sae.latent_mean, mean)
    torch.testing.assert_close(sae.latent_std, std)
    t = {k: v.double() for k, v in state.items()}
    x = x_batch()
    f = topk_relu((x.double() - t["pre_bias"]) @ t["encoder.weight"].T + t["latent_bias"], K)
    close(sae.encode(x), f)
    close(sae.decode(f.float()), f @ t["decoder.weight"].T + t["pre_bias"])

    # the statistics survive a native round trip
    again = load_sae(save_native(sae, tmp_path / "native"))
    torch.testing.assert_close(again.latent_mean, mean)


# -- round trips -------------------------------------------------------------------------------
def random_sae(architecture: str, **changes):
    sae = build_sae(SaeConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K, hook_name="blocks.2.x",
                              model_name="m", metadata={"note": [1, 2]}, **changes))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(*p.shape) * 0.5)
    sae.labels = {"first": 0, "last": D_SAE - 1}
    return sae


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "batchtopk", "gated", "topk", "topk-sigmoid", "spade"])
def test_native_round_trip(tmp_path, architecture):
    sae = random_sae(architecture, n_concepts=2 if architecture == "topk-sigmoid" else 0)
    loaded = load_sae(save_native(sae, tmp_path))
    assert detect_format(tmp_path) == "native"
    assert loaded.cfg == sae.cfg and loaded.labels == sae.labels and type(loaded) is type(sae)
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = x_batch()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    again = load_sae(save_native(loaded, tmp_path / "again"))
    assert again.cfg == sae.cfg


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "batchtopk", "gated", "topk"])
def test_native_to_saelens_round_trip(tmp_path, architecture):
    sae = random_sae(architecture, rescale_acts_by_decoder_norm=architecture == "topk")
    out = save_saelens(sae, tmp_path)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.x" and cfg["metadata"]["sae_lens_version"] >= "6"
    loaded = load_sae(out)
    assert loaded.labels == sae.labels and loaded.cfg.hook_name == "blocks.2.x"
    x = x_batch()
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    f = sae.encode(x)
    torch.testing.assert_close(loaded.decode(f), sae.decode(f))


@pytest.mark.parametrize("architecture", ["topk-sigmoid", "spade"])
def test_saelens_writer_refuses_architectures_it_cannot_express(tmp_path, architecture):
    with pytest.raises(InvalidArgument) as err:
        save_saelens(random_sae(architecture), tmp_path)
    assert err.value.field == "architecture"


# -- errors ------------------------------------------------------------------------------------
def test_corrupt_safetensors(tmp_path):
    saelens_jumprelu(tmp_path)
    data = (tmp_path / "sae_weights.safetensors").read_bytes()
    (tmp_path / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="corrupt") as err:
        load_sae(tmp_path)
    assert err.value.field == str(tmp_path / "sae_weights.safetensors")


def test_nan_tensor_is_named(tmp_path):
    t = saelens_jumprelu(tmp_path)
    bad = {k: v.float() for k, v in t.items()}
    bad["b_enc"][3] = float("nan")
    save_file(bad, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="'b_enc' contains NaN or inf") as err:
        load_sae(tmp_path)
    assert err.value.field.endswith("sae_weights.safetensors")


def test_inf_in_dictionary_learning_tensor_is_named(tmp_path):
    state = {"bias": rand(D_IN), "encoder.weight": rand(D_SAE, D_IN), "encoder.bias": rand(D_SAE),
             "decoder.weight": rand(D_IN, D_SAE)}
    state["decoder.weight"][0, 0] = float("inf")
    write_dictionary_learning(tmp_path, "AutoEncoder", state)
    with pytest.raises(FormatError, match="'decoder.weight' contains NaN or inf"):
        load_sae(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    t = saelens_jumprelu(tmp_path)
    bad = {k: v.float() for k, v in t.items()}
    bad["threshold"] = torch.zeros(D_SAE + 1)
    save_file(bad, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match=r"'threshold' has shape \(11,\), expected \(10,\)"):
        load_sae(tmp_path)


def test_integer_weights_are_refused(tmp_path):
    t = saelens_jumprelu(tmp_path)
    bad = {k: v.float() for k, v in t.items()}
    bad["W_enc"] = torch.ones(D_IN, D_SAE, dtype=torch.int64)
    save_file(bad, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="'W_enc' has dtype int64"):
        load_sae(tmp_path)


def test_missing_weight_file_and_missing_tensor(tmp_path):
    saelens_jumprelu(tmp_path / "a")
    (tmp_path / "a" / "sae_weights.safetensors").unlink()
    with pytest.raises(FormatError, match="missing file") as err:
        load_sae(tmp_path / "a")
    assert err.value.field == str(tmp_path / "a" / "sae_weights.safetensors")

    t = saelens_jumprelu(tmp_path / "b")
    save_file({k: v.float() for k, v in t.items() if k != "threshold"}, str(tmp_path / "b" / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="'threshold' missing"):
        load_sae(tmp_path / "b")


def test_missing_config_of_openai_dir_and_unrecognised_dir(tmp_path):
    (tmp_path / "x").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "x" / "state_dict.pth")
    with pytest.raises(FormatError, match="no SAE files recognised"):
        load_sae(tmp_path / "x")
    with pytest.raises(FormatError, match="missing file") as err:
        load_sae(tmp_path / "x", format="openai_topk")
    assert err.value.field.endswith("config.json")
    with pytest.raises(FormatError, match="no such directory"):
        load_sae(tmp_path / "nope")


def test_unknown_architecture_is_not_found(tmp_path):
    saelens_jumprelu(tmp_path, architecture="temporal")
    with pytest.raises(NotFound) as err:
        load_sae(tmp_path)
    assert "temporal" in err.value.message


def test_unexpected_tensor_for_declared_architecture(tmp_path):
    saelens_jumprelu(tmp_path, architecture="standard")  # file has a threshold a standard SAE lacks
    with pytest.raises(FormatError, match="unexpected tensor.*'threshold'"):
        load_sae(tmp_path)


def test_invalid_json_and_bad_labels(tmp_path):
    saelens_jumprelu(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"too_big": D_SAE}))
    with pytest.raises(FormatError, match="'too_big'") as err:
        load_sae(tmp_path)
    assert err.value.field.endswith("labels.json")
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match="invalid JSON"):
        load_sae(tmp_path)


class _Payload:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse, not run it."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    write_dictionary_learning(tmp_path / "d", "AutoEncoder", {})
    torch.save({"bias": payload}, tmp_path / "d" / "ae.pt")
    with pytest.raises(FormatError, match="weights_only=True") as err:
        load_sae(tmp_path / "d")
    assert err.value.field.endswith("ae.pt")
    assert not marker.exists()


@pytest.mark.parametrize(("option", "value"), [("dtype", "int8"), ("dtype", "float8"), ("norm_scaling_factor", 0.0),
                                               ("norm_scaling_factor", float("nan"))])
def test_bad_load_options_are_invalid_arguments(tmp_path, option, value):
    saelens_jumprelu(tmp_path)
    with pytest.raises(InvalidArgument) as err:
        load_sae(tmp_path, **{option: value})
    assert err.value.field == option
