"""Hook sites: names parse, resolve on tiny HF models (saved and reloaded), hooks read the right tensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from sae_runtime.demo.tiny_models import build_tiny_causal_lm, build_tiny_llava, build_tiny_unet
from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.sites import HookSite, SiteKind, attached

FAMILIES = ("llama", "gpt2", "qwen2", "gemma")
N_LAYERS = 3


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        path = build_tiny_causal_lm(tmp_path_factory.mktemp(fam), fam, seed=1, num_layers=N_LAYERS, init_std=0.1)
        out[fam] = AutoModelForCausalLM.from_pretrained(path).eval()
    return out


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path_factory.mktemp("llava"), seed=2)).eval()


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return UNet2DConditionModel.from_pretrained(build_tiny_unet(tmp_path_factory.mktemp("unet"), seed=3)).eval()


def _layers_by_hand(model):
    """The decoder layers, found the way a person reading the model code would (second code path)."""
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize(
    "name, kind, layer, canonical",
    [
        ("blocks.3.hook_resid_pre", SiteKind.RESID_PRE, 3, "blocks.3.hook_resid_pre"),
        ("blocks.0.hook_resid_post", SiteKind.RESID_POST, 0, "blocks.0.hook_resid_post"),
        ("blocks.12.hook_mlp_out", SiteKind.MLP_OUT, 12, "blocks.12.hook_mlp_out"),
        ("layers.7", SiteKind.RESID_POST, 7, "blocks.7.hook_resid_post"),
        ("layers.7.mlp", SiteKind.MLP_OUT, 7, "blocks.7.hook_mlp_out"),
        ("resid_4", SiteKind.RESID_POST, 4, "blocks.4.hook_resid_post"),
        ("model.layers.2", SiteKind.RESID_POST, 2, "blocks.2.hook_resid_post"),
        ("model.language_model.layers.2", SiteKind.RESID_POST, 2, "blocks.2.hook_resid_post"),
        ("transformer.h.1", SiteKind.RESID_POST, 1, "blocks.1.hook_resid_post"),
        ("vision.layers.22", SiteKind.VISION_LAYER, 22, "vision.layers.22"),
        ("vision_tower.vision_model.encoder.layers.22", SiteKind.VISION_LAYER, 22, "vision.layers.22"),
        ("model.vision_tower.encoder.layers.5", SiteKind.VISION_LAYER, 5, "vision.layers.5"),
    ],
)
def test_layer_names_parse_to_canonical_sites(name, kind, layer, canonical):
    site = HookSite.parse(name)
    assert (site.kind, site.layer, site.name) == (kind, layer, canonical)
    assert HookSite.parse(site.name) == site


@pytest.mark.parametrize(
    "name, block",
    [
        ("unet.down_blocks.2.attentions.1", "down_blocks.2.attentions.1"),
        ("unet.mid_block.attentions.0", "mid_block.attentions.0"),
        ("unet.up_blocks.0.attentions.0", "up_blocks.0.attentions.0"),
        ("up_blocks.0.attentions.1", "up_blocks.0.attentions.1"),
    ],
)
def test_unet_names_parse(name, block):
    site = HookSite.parse(name)
    assert site.kind is SiteKind.UNET_BLOCK and site.block == block and site.name == f"unet.{block}"


@pytest.mark.parametrize(
    "name", ["blocks.1.hook_resid_mid", "blocks.x.hook_resid_pre", "blocks.-1.hook_resid_pre", "layer.3", "resid",
             "unet.down_blocks.2.resnets.0", "vision.layers", "", "blocks.1.attn.hook_z"]
)
def test_unknown_names_raise_not_found(name):
    with pytest.raises(NotFound) as err:
        HookSite.parse(name)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_text_site_resolves_generically(lms, family):
    model = lms[family]
    layers = _layers_by_hand(model)
    hidden = model.config.get_text_config().hidden_size
    for layer in range(N_LAYERS):
        for name in (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post", f"layers.{layer}", f"resid_{layer}"):
            site = HookSite.parse(name)
            assert site.resolve(model) is layers[layer]
            assert site.width(model) == hidden
        assert HookSite.parse(f"blocks.{layer}.hook_mlp_out").resolve(model) is layers[layer].mlp
    with pytest.raises(NotFound) as err:
        HookSite.parse(f"blocks.{N_LAYERS}.hook_resid_post").resolve(model)
    assert err.value.field == f"blocks.{N_LAYERS}.hook_resid_post" and "out of range" in str(err.value)


def _record(model, names, ids):
    """Activations seen by site callbacks (read only) for one forward."""
    seen = {}

    def recorder(name):
        def fn(x, grid):
            seen[name] = x.clone()
            return None

        return fn

    with attached(model, [(HookSite.parse(n), recorder(n)) for n in names]):
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    return seen, out


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_equals_previous_resid_post_and_hidden_states(lms, family):
    model = lms[family]
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    names = [f"blocks.{L}.hook_{k}" for L in range(N_LAYERS) for k in ("resid_pre", "resid_post", "mlp_out")]
    seen, out = _record(model, names, ids)
    hs = out.hidden_states  # (embeddings, layer 0 output, ...); the last one has the final norm applied
    assert torch.equal(seen["blocks.0.hook_resid_pre"], hs[0])
    for L in range(1, N_LAYERS):
        assert torch.equal(seen[f"blocks.{L}.hook_resid_pre"], seen[f"blocks.{L - 1}.hook_resid_post"])
        assert torch.equal(seen[f"blocks.{L - 1}.hook_resid_post"], hs[L])
    # mlp_out: the output of the layer's MLP module, captured by a plain torch hook.
    captured = []
    handle = _layers_by_hand(model)[1].mlp.register_forward_hook(lambda m, a, o: captured.append(o.clone()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    assert torch.equal(seen["blocks.1.hook_mlp_out"], captured[0])
    assert seen["blocks.1.hook_mlp_out"].shape == (2, 6, model.config.get_text_config().hidden_size)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_the_block_and_after_an_exception(lms):
    model = lms["llama"]
    ids = torch.randint(5, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    before = _hook_count(model)
    bump = lambda x, grid: x + 1.0  # noqa: E731
    with attached(model, [(HookSite.parse("blocks.0.hook_resid_pre"), bump), (HookSite.parse("blocks.1.hook_resid_post"), bump)]):
        assert _hook_count(model) == before + 2
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, base)
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with attached(model, [(HookSite.parse("blocks.0.hook_mlp_out"), bump)]):
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    # A site that fails to resolve midway removes the hooks attached before it.
    with pytest.raises(NotFound):
        with attached(model, [(HookSite.parse("blocks.0.hook_mlp_out"), bump), (HookSite.parse("blocks.9.hook_resid_pre"), bump)]):
            pass
    assert _hook_count(model) == before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_llava_sites(llava):
    vision_layers = llava.model.vision_tower.encoder.layers
    lm_layers = llava.model.language_model.layers
    for name in ("vision.layers.1", "vision_tower.vision_model.encoder.layers.1", "model.vision_tower.encoder.layers.1"):
        assert HookSite.parse(name).resolve(llava) is vision_layers[1]
    assert HookSite.parse("blocks.1.hook_resid_post").resolve(llava) is lm_layers[1]
    assert HookSite.parse("blocks.0.hook_mlp_out").resolve(llava) is lm_layers[0].mlp
    assert HookSite.parse("vision.layers.0").width(llava) == llava.config.vision_config.hidden_size
    with pytest.raises(NotFound):
        HookSite.parse(f"vision.layers.{len(vision_layers)}").resolve(llava)
    # The vision site sees every token, CLS included: output of encoder layer L = hidden_states[L + 1].
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    with attached(llava, [(HookSite.parse("vision.layers.1"), lambda x, g: seen.append(x.clone()))]):
        with torch.no_grad():
            hs = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert seen[0].shape == (2, 1 + 16, 32)
    assert torch.equal(seen[0], hs[2])


def test_vision_site_needs_a_vision_tower(lms):
    with pytest.raises(NotFound, match="vision"):
        HookSite.parse("vision.layers.0").resolve(lms["llama"])


def test_unet_sites_read_the_block_update_in_nhwc(unet):
    site = HookSite.parse("unet.down_blocks.1.attentions.0")
    block = unet.down_blocks[1].attentions[0]
    assert site.resolve(unet) is block and site.width(unet) == 64
    assert HookSite.parse("unet.mid_block.attentions.0").resolve(unet) is unet.mid_block.attentions[0]
    for bad in ("unet.down_blocks.2.attentions.0", "unet.down_blocks.9.attentions.0", "unet.up_blocks.0.attentions.0"):
        with pytest.raises(NotFound) as err:
            HookSite.parse(bad).resolve(unet)
        assert err.value.field == bad
    with pytest.raises(NotFound):
        HookSite.parse("blocks.0.hook_resid_post").resolve(unet)

    seen = {}

    def shift(x, grid):
        seen["x"], seen["grid"] = x.clone(), grid
        return x + torch.arange(x.shape[-1], dtype=x.dtype)  # + c on channel c

    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    raw = {}
    with attached(unet, [(site, shift)]):
        # Prepended after the site hook, so it runs first and sees the block's own input and output.
        handle = block.register_forward_hook(
            lambda m, a, kw, o: raw.update(inp=(a[0] if a else kw["hidden_states"]).clone(), out=o[0].clone()),
            with_kwargs=True, prepend=True,
        )
        try:
            with torch.no_grad():
                unet(sample, 10, encoder_hidden_states=text)
        finally:
            handle.remove()
    b, c, h, w = raw["out"].shape
    assert seen["grid"] == (h, w) == (8, 8)
    expected_update = (raw["out"] - raw["inp"]).permute(0, 2, 3, 1).reshape(b, h * w, c)
    assert seen["x"].shape == (2, 64, 64)
    torch.testing.assert_close(seen["x"], expected_update, atol=1e-6, rtol=0)


def test_unet_edit_changes_the_block_output_by_the_delta(unet):
    """out' = out + delta, delta permuted back to NCHW (channel c moved by c)."""
    site = HookSite.parse("unet.mid_block.attentions.0")
    block = unet.mid_block.attentions[0]
    outs = []
    handle = block.register_forward_hook(lambda m, a, o: outs.append(o[0].clone()))  # runs after the site hook
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            unet(sample, 10, encoder_hidden_states=text)
            with attached(unet, [(site, lambda x, g: x + torch.arange(x.shape[-1], dtype=x.dtype))]):
                unet(sample, 10, encoder_hidden_states=text)
    finally:
        handle.remove()
    diff = outs[1] - outs[0]
    expected = torch.arange(64, dtype=diff.dtype).view(1, 64, 1, 1).expand_as(diff)
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=0)


def test_sae_width_must_match_the_site(lms, unet):
    with pytest.raises(InvalidArgument) as err:
        HookSite.parse("blocks.0.hook_resid_post").check_sae_width(lms["llama"], 48, "res0")
    assert err.value.field == "res0" and "48" in str(err.value) and "32" in str(err.value)
    HookSite.parse("blocks.0.hook_resid_post").check_sae_width(lms["llama"], 32, "res0")
    with pytest.raises(InvalidArgument):
        HookSite.parse("unet.mid_block.attentions.0").check_sae_width(unet, 32, "mid")
