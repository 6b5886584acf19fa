"""SteeringContext: exact per-row interventions and readouts, checked against hand-written formulas
and against each row run alone. Tiny HF models are built from configs, saved and reloaded."""

from __future__ import annotations


import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from sae_runtime.demo.tiny_models import build_tiny_causal_lm, build_tiny_llava, build_tiny_unet
from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.plan import CfgHalf, EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, TokenScope, VisionScope
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext
from tests.sae_runtime.steering_helpers import D, greedy, jumprelu_by_hand, make_sae, probe, tiny_llama







def edit(sae: str, op: EditOp, latents, value=0.0, normalize=False) -> LatentEdit:
    return LatentEdit(sae, op, tuple(latents), value, normalize)


def plan(*edits, scope=Scope(), preserve_error=True, saes=None) -> InterventionPlan:
    p = InterventionPlan(tuple(edits), scope, preserve_error)
    return p.resolve({k: a.sae for k, a in saes.items()}) if saes else p


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"), seed=5, num_layers=3)


@pytest.fixture(scope="module")
def lm_saes():
    return {
        "r0": AttachedSae("r0", make_sae("jumprelu", D, 96, 11), HookSite.parse("blocks.0.hook_resid_post")),
        "m1": AttachedSae("m1", make_sae("standard", D, 64, 12), HookSite.parse("blocks.1.hook_mlp_out")),
        "p1": AttachedSae("p1", make_sae("jumprelu", D, 80, 13), HookSite.parse("layers.1")),
        "k2": AttachedSae("k2", make_sae("topk", D, 64, 14, k=6), HookSite.parse("blocks.2.hook_resid_pre")),
        "n1": AttachedSae("n1", make_sae("standard", D, 48, 15, normalize_activations="constant_norm_rescale"),
                          HookSite.parse("blocks.1.hook_resid_pre")),
    }


def ids_of(batch, length, seed, vocab=128):
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))




# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma"])
def test_empty_plans_leave_logits_bit_identical(tmp_path, family):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path, family, seed=1, init_std=0.1)).eval()
    saes = {"s": AttachedSae("s", make_sae("jumprelu", D, 64, 1), HookSite.parse("blocks.1.hook_resid_pre"))}
    ids = ids_of(3, 7, 0)
    with torch.no_grad():
        base = model(ids).logits
        # No plan, an empty plan, and a readout on every row: nothing may move by a single bit.
        with SteeringContext(model, saes, [None, InterventionPlan(), None], ReadoutSpec(("s",), 3)) as ctx:
            ctx.prefill()
            out = model(ids).logits
        assert torch.equal(out, base)
        # Rows without a plan stay bit-identical even when another row in the batch is steered.
        steer = plan(edit("s", EditOp.SET, [1, 2], 4.0), saes=saes)
        with SteeringContext(model, saes, [None, steer, InterventionPlan()]) as ctx:
            out = model(ids).logits
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1], atol=1e-3)


def test_error_preserving_clamp_matches_the_formula(llama, lm_saes):
    saes = {"r0": lm_saes["r0"]}
    sae = saes["r0"].sae
    latents, v = [3, 17, 40, 41], 2.5
    ids = ids_of(2, 6, 1)
    layer = llama.model.layers[0]
    with torch.no_grad(), SteeringContext(llama, saes, [plan(edit("r0", EditOp.SET, latents, v), saes=saes)] * 2) as ctx:
        ctx.prefill()
        with probe(layer) as log:
            llama(ids)
        x, hooked = log["before"][0], log["after"][0]
        f = jumprelu_by_hand(sae, x)
        expected = x + sum((v - f[..., i:i + 1]) * sae.W_dec[i] for i in latents)
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)
    assert (hooked - x).abs().max() > 0.1


OP_CASES = [
    (EditOp.SET, 3.0, False, lambda f, v, x, w: torch.full_like(f, v)),
    (EditOp.ABLATE, 0.0, False, lambda f, v, x, w: torch.zeros_like(f)),
    (EditOp.SCALE, -1.5, False, lambda f, v, x, w: f * v),
    (EditOp.ADD, 0.7, False, lambda f, v, x, w: f + v),
    (EditOp.ADD, 0.2, True, lambda f, v, x, w: f + v * x.norm(dim=-1, keepdim=True) / w.norm()),
    (EditOp.CAP, 0.05, False, lambda f, v, x, w: torch.minimum(f, torch.tensor(v))),
]


@pytest.mark.parametrize("op, value, normalize, new_f", OP_CASES, ids=lambda c: getattr(c, "value", None))
def test_each_op_matches_the_formula(llama, lm_saes, op, value, normalize, new_f):
    saes = {"p1": lm_saes["p1"]}
    sae = saes["p1"].sae
    latents = [0, 5, 9, 33, 79]
    ids = ids_of(1, 8, 2)
    with torch.no_grad(), SteeringContext(llama, saes, [plan(edit("p1", op, latents, value, normalize), saes=saes)]):
        with probe(llama.model.layers[1]) as log:
            llama(ids)
        x, hooked = log["before"][0], log["after"][0]
        f = jumprelu_by_hand(sae, x)
        expected = x.clone()
        for i in latents:
            expected += (new_f(f[..., i:i + 1], value, x, sae.W_dec[i]) - f[..., i:i + 1]) * sae.W_dec[i]
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)
    if op is EditOp.ADD and normalize:  # the added vector is value * ||x|| along the unit decoder direction
        torch.testing.assert_close((hooked - x).norm(dim=-1) / x.norm(dim=-1),
                                   (sum(sae.W_dec[i] / sae.W_dec[i].norm() for i in latents) * value).norm().expand(1, 8),
                                   atol=1e-5, rtol=0)


def test_repeated_edits_of_one_latent_compose_in_order_and_norm_scale_applies(llama, lm_saes):
    """scale 3 then cap 0.4 on the same latent; SAE with constant_norm_rescale: delta times ||x|| / sqrt(d)."""
    saes = {"n1": lm_saes["n1"]}
    sae = saes["n1"].sae
    p = plan(edit("n1", EditOp.SCALE, [4, 7], 3.0), edit("n1", EditOp.CAP, [4], 0.4), saes=saes)
    with torch.no_grad(), SteeringContext(llama, saes, [p]):
        with probe(llama.model.layers[1], inputs=True) as log:  # blocks.1.hook_resid_pre
            llama(ids_of(1, 5, 3))
    x, hooked = log["before"][0], log["after"][0]
    scale = x.norm(dim=-1, keepdim=True) / D**0.5
    f = torch.relu((x / scale - sae.b_dec) @ sae.W_enc + sae.b_enc)
    f4, f7 = torch.minimum(3 * f[..., 4:5], torch.tensor(0.4)), 3 * f[..., 7:8]
    expected = x + scale * ((f4 - f[..., 4:5]) * sae.W_dec[4] + (f7 - f[..., 7:8]) * sae.W_dec[7])
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["r0", "k2"])
def test_without_error_term_the_activation_is_the_reconstruction(llama, lm_saes, name):
    saes = {name: lm_saes[name]}
    sae = saes[name].sae
    # r0 reads the output of layer 0, k2 the input of layer 2.
    layer, inputs = (llama.model.layers[0], False) if name == "r0" else (llama.model.layers[2], True)
    p = plan(edit(name, EditOp.SET, [2, 9], 1.5), edit(name, EditOp.ABLATE, [5]), preserve_error=False, saes=saes)
    with torch.no_grad(), SteeringContext(llama, saes, [p]):
        with probe(layer, inputs) as log:
            llama(ids_of(1, 6, 4))
    x, hooked = log["before"][0], log["after"][0]
    with torch.no_grad():
        f = jumprelu_by_hand(sae, x) if name == "r0" else sae.encode(x)
        f[..., [2, 9]] = 1.5
        f[..., 5] = 0.0
        expected = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)


def test_ablate_and_clamp_change_downstream_logits(llama, lm_saes):
    saes = {"r0": lm_saes["r0"]}
    ids = ids_of(1, 6, 5)
    with torch.no_grad():
        base = llama(ids).logits
        x = torch.zeros(0)
        with SteeringContext(llama, saes, [None]):
            with probe(llama.model.layers[0]) as log:
                llama(ids)
        x = log["before"][0]
        active = jumprelu_by_hand(saes["r0"].sae, x)[0].gt(0).sum(0).nonzero().flatten().tolist()
        assert active, "the test SAE should have active latents"
        for p in (plan(edit("r0", EditOp.ABLATE, active), saes=saes), plan(edit("r0", EditOp.SET, [1, 2, 3], 5.0), saes=saes)):
            with SteeringContext(llama, saes, [p]):
                out = llama(ids).logits
            assert (out - base).abs().max() > 1e-2


# -- scopes ------------------------------------------------------------------------------------


def test_token_scopes_prompt_generated_all_and_padding(llama, lm_saes):
    """Prefill (left-padded row 0) then one decode step with the KV cache: each row's edit touches
    only its scope's positions and never padding."""
    saes = {"r0": lm_saes["r0"]}
    e = edit("r0", EditOp.SET, [1, 2], 3.0)
    scopes = [TokenScope.PROMPT, TokenScope.GENERATED, TokenScope.ALL, None]
    plans = [plan(e, scope=Scope(tokens=s), saes=saes) if s else None for s in scopes]
    ids = ids_of(4, 6, 6)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), SteeringContext(llama, saes, plans) as ctx:
        with probe(llama.model.layers[0]) as log:
            ctx.prefill(mask)
            out = llama(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ctx.decode()
            llama(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), position_ids=pos[:, -1:] + 1,
                  past_key_values=out.past_key_values, use_cache=True)
    pre_delta = (log["after"][0] - log["before"][0]).abs().amax(-1)  # (4, 6)
    dec_delta = (log["after"][1] - log["before"][1]).abs().amax(-1)  # (4, 1)
    assert (pre_delta[0, :2] == 0).all() and (pre_delta[0, 2:] > 0).all()  # prompt, padding untouched
    assert (dec_delta[0] == 0).all()
    assert (pre_delta[1] == 0).all() and (dec_delta[1] > 0).all()  # generated
    assert (pre_delta[2] > 0).all() and (dec_delta[2] > 0).all()  # all
    assert (pre_delta[3] == 0).all() and (dec_delta[3] == 0).all()  # no plan


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path_factory.mktemp("llava"), seed=4)).eval()


def test_vision_scope_cls_and_all_and_effect_on_the_language_model(llava):
    saes = {"v1": AttachedSae("v1", make_sae("jumprelu", 32, 64, 21), HookSite.parse("vision.layers.1"))}
    e = edit("v1", EditOp.SET, [0, 1, 2], 4.0)
    plans = [plan(e, scope=Scope(vision=VisionScope.CLS), saes=saes), plan(e, saes=saes), None]
    image_token = llava.config.image_token_id
    ids = torch.tensor([[1] + [image_token] * 16 + [20, 21, 22]] * 3)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = llava(input_ids=ids, pixel_values=pixels).logits
        with SteeringContext(llava, saes, plans) as ctx:
            ctx.prefill()
            with probe(llava.model.vision_tower.encoder.layers[1]) as log:
                out = llava(input_ids=ids, pixel_values=pixels).logits
    delta = (log["after"][0] - log["before"][0]).abs().amax(-1)  # (3, 17)
    assert delta[0, 0] > 0 and (delta[0, 1:] == 0).all()  # CLS only
    assert (delta[1] > 0).all()  # every vision token
    assert (delta[2] == 0).all()
    # Layer 1 of 3 is hidden_states[-2], which the projector reads: the edit reaches the LM.
    assert (out[1] - base[1]).abs().max() > 1e-3
    assert torch.equal(out[2], base[2])


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return UNet2DConditionModel.from_pretrained(build_tiny_unet(tmp_path_factory.mktemp("unet"), seed=3)).eval()


def test_unet_mask_step_window_and_cfg_half(unet):
    saes = {"d1": AttachedSae("d1", make_sae("jumprelu", 64, 128, 31), HookSite.parse("unet.down_blocks.1.attentions.0"))}
    sae = saes["d1"].sae
    e = edit("d1", EditOp.ADD, [3, 8], 2.0)
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0  # left half of the image
    plans = [
        plan(e, scope=Scope(mask=mask), saes=saes),
        plan(e, scope=Scope(step_start=1, step_end=2), saes=saes),
        plan(e, scope=Scope(cfg_half=CfgHalf.COND), saes=saes),
        None,
    ]
    sample = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # [uncond x4, cond x4]
    text = torch.randn(8, 5, 32, generator=torch.Generator().manual_seed(1))
    block = unet.down_blocks[1].attentions[0]
    deltas = []
    with torch.no_grad(), SteeringContext(unet, saes, plans) as ctx:
        for step in range(3):
            ctx.set_unet_step(step, 3, cfg_doubled=True)
            with probe(block) as log:
                unet(sample, 10 * (3 - step), encoder_hidden_states=text)
            deltas.append(log["after"][0] - log["before"][0])  # (8, 64, 8, 8)
    moved = [d.abs().amax(1) > 0 for d in deltas]  # (8, 8, 8) spatial map of touched cells
    for step in range(3):
        for half in (0, 4):
            m = moved[step][0 + half]
            assert m[:, :4].all() and not m[:, 4:].any()  # mask: left half only, both CFG halves
            assert moved[step][1 + half].all() == (step == 1) and moved[step][1 + half].any() == (step == 1)
            assert not moved[step][3 + half].any()
        assert not moved[step][2].any() and moved[step][6].all()  # cond half only (second half of the batch)
    # The edit adds 2.0 * W_dec[i] per latent inside the mask (error term kept).
    torch.testing.assert_close(
        deltas[0][0, :, :, 0],
        (2.0 * (sae.W_dec[3] + sae.W_dec[8]))[:, None].expand(64, 8),
        atol=1e-5, rtol=0,
    )


# -- mixed batches -----------------------------------------------------------------------------



def test_mixed_batch_rows_equal_each_row_run_alone(llama, lm_saes):
    saes = lm_saes
    plans = [
        None,
        plan(edit("r0", EditOp.SET, [1, 2, 3], 4.0), saes=saes),
        plan(edit("m1", EditOp.ABLATE, range(0, 64, 3)), edit("r0", EditOp.SCALE, [2], 3.0), scope=Scope(tokens=TokenScope.PROMPT), saes=saes),
        plan(edit("p1", EditOp.ADD, [7], 0.3, normalize=True), edit("p1", EditOp.CAP, [7, 8], 0.1), scope=Scope(tokens=TokenScope.GENERATED), saes=saes),
        plan(edit("r0", EditOp.SET, [5], 2.0), edit("k2", EditOp.SET, [0, 1], 3.0), preserve_error=False, saes=saes),
        plan(edit("n1", EditOp.ADD, [4], 1.0), edit("k2", EditOp.ABLATE, [10, 11, 12]), saes=saes),
        InterventionPlan(),
    ]
    lengths = [5, 7, 4, 7, 6, 3, 7]
    rows = [ids_of(1, n, 100 + r) for r, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - row.shape[1]:], mask[r, width - row.shape[1]:] = row[0], 1
    readout = ReadoutSpec(("r0", "k2"), top_k=4)
    with torch.no_grad():
        with SteeringContext(llama, saes, plans, readout) as ctx:
            batched = greedy(llama, ids, mask, ctx, steps=3)
        batch_readouts = ctx.readouts()
        for r in range(len(rows)):
            with SteeringContext(llama, saes, [plans[r]], readout) as ctx:
                alone = greedy(llama, rows[r], torch.ones_like(rows[r]), ctx, steps=3)
            torch.testing.assert_close(batched[r], alone[0], atol=1e-5, rtol=0)
            single = ctx.readouts()[0]
            for name in readout.saes:
                for phase in ("prefill", "decode"):
                    a, b = batch_readouts[r][name].phases[phase], single[name].phases[phase]
                    assert a.before.indices.shape == b.before.indices.shape == (lengths[r] if phase == "prefill" else 3, 4)
                    torch.testing.assert_close(a.after.values, b.after.values, atol=1e-5, rtol=0)
                    assert a.pooled_before.count == b.pooled_before.count
                    torch.testing.assert_close(a.pooled_after.sum, b.pooled_after.sum, atol=1e-4, rtol=0)
                    torch.testing.assert_close(a.pooled_before.max, b.pooled_before.max, atol=1e-5, rtol=0)
    base = greedy(llama, ids, mask, _NoCtx(), steps=3)
    for r in (0, 6):
        assert torch.equal(batched[r], base[r])  # unsteered rows are bit-identical in the mixed batch
    for r in range(1, 6):
        assert (batched[r] - base[r]).abs().max() > 1e-4


class _NoCtx:
    def prefill(self, *a):
        pass

    def decode(self, *a):
        pass


# -- readouts ----------------------------------------------------------------------------------


def test_readout_topk_and_pooled_stats_match_a_hand_encode(llama, lm_saes):
    saes = {"r0": lm_saes["r0"]}
    sae = saes["r0"].sae
    ids = ids_of(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    plans = [plan(edit("r0", EditOp.SET, [60], 50.0), saes=saes), None]
    with torch.no_grad(), SteeringContext(llama, saes, plans, ReadoutSpec(("r0",), top_k=3)) as ctx:
        with probe(llama.model.layers[0]) as log:
            greedy(llama, ids, mask, ctx, steps=2)
    read = ctx.readouts()
    f_prompt = jumprelu_by_hand(sae, log["before"][0])
    f_gen = jumprelu_by_hand(sae, torch.cat(log["before"][1:], 1))
    for r, valid in ((0, slice(0, 5)), (1, slice(2, 5))):
        pr, gen = read[r]["r0"].prompt, read[r]["r0"].generated
        fp = f_prompt[r, valid]
        top = fp.topk(3, dim=-1)
        torch.testing.assert_close(pr.before.values, top.values, atol=1e-5, rtol=0)
        assert torch.equal(pr.before.indices, top.indices)
        assert pr.pooled_before.count == fp.shape[0] and gen.pooled_before.count == 2
        torch.testing.assert_close(pr.pooled_before.mean, fp.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(pr.pooled_before.max, fp.amax(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(gen.pooled_before.sum, f_gen[r].sum(0), atol=1e-5, rtol=0)
    # After the clamp latent 60 tops every position of row 0, with exactly the clamped value.
    after = read[0]["r0"].prompt.after
    assert (after.indices[:, 0] == 60).all() and (after.values[:, 0] == 50.0).all()
    assert (read[0]["r0"].generated.pooled_after.max[60] == 50.0) and read[0]["r0"].prompt.pooled_after.mean[60] == 50.0
    assert torch.equal(read[1]["r0"].prompt.after.indices, read[1]["r0"].prompt.before.indices)


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_raises_typed_errors(llama, lm_saes):
    wide = {"w": AttachedSae("w", make_sae("jumprelu", 48, 64, 1), HookSite.parse("blocks.0.hook_resid_post"))}
    ctx = SteeringContext(llama, wide, [plan(edit("w", EditOp.ABLATE, [1]))])
    with pytest.raises(InvalidArgument) as err:
        ctx.__enter__()
    assert err.value.field == "w"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.modules()) == 0
    with pytest.raises(NotFound):
        SteeringContext(llama, lm_saes, [plan(edit("nope", EditOp.ABLATE, [1]))])
    with pytest.raises(NotFound):
        SteeringContext(llama, lm_saes, [None], ReadoutSpec(("nope",)))
    far = {"f": AttachedSae("f", make_sae("jumprelu", D, 8, 1), HookSite.parse("blocks.7.hook_resid_post"))}
    with pytest.raises(NotFound):
        with SteeringContext(llama, far, [None], ReadoutSpec(("f",))):
            pass
    with pytest.raises(NotFound):
        HookSite.parse("blocks.0.hook_attn_out")
    with pytest.raises(InvalidArgument):
        SteeringContext(llama, lm_saes, [None]).set_phase("warmup")


def test_hooks_removed_after_an_exception_in_the_block(llama, lm_saes):
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.modules())  # noqa: E731
    with pytest.raises(RuntimeError, match="boom"):
        with SteeringContext(llama, lm_saes, [plan(edit("r0", EditOp.ABLATE, [1]), edit("k2", EditOp.ABLATE, [2]))]):
            assert count() == 2
            raise RuntimeError("boom")
    assert count() == 0


# -- fast paths and HF generate ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "batchtopk", "gated", "topk"])
def test_restricted_encoder_equals_full_encode_then_gather(arch):
    """The per-context encoder slice of a selective SAE must give the latents a full encode gives."""
    sae = make_sae(arch, 24, 50, 3, k=5)
    idx = torch.tensor([0, 7, 8, 49])
    if arch == "topk":  # membership depends on every latent: no slice
        assert not sae.selective
        with pytest.raises(TypeError):
            sae.restrict(idx)
        return
    sub = sae.restrict(idx)
    assert sub.d_sae == 4
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        full = sae.encode(x).index_select(-1, idx)
        assert (full != 0).any()
        torch.testing.assert_close(sub.encode_normalized(x), full, atol=1e-6, rtol=0)


def test_gated_sae_clamp_keeps_the_error_term(llama):
    saes = {"g": AttachedSae("g", make_sae("gated", D, 40, 8), HookSite.parse("blocks.0.hook_resid_post"))}
    sae = saes["g"].sae
    with torch.no_grad(), SteeringContext(llama, saes, [plan(edit("g", EditOp.SET, [1, 30], 2.0), saes=saes)]):
        with probe(llama.model.layers[0]) as log:
            llama(ids_of(1, 6, 9))
        x, hooked = log["before"][0], log["after"][0]
        f = sae.encode(x)  # full encode: a second code path to the selective one used by the hook
        expected = x + (2.0 - f[..., 1:2]) * sae.W_dec[1] + (2.0 - f[..., 30:31]) * sae.W_dec[30]
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)


def test_auto_phase_under_hf_generate_matches_the_manual_loop(llama, lm_saes):
    saes = {"r0": lm_saes["r0"]}
    e = edit("r0", EditOp.SET, [1, 2], 3.0)
    plans = [plan(e, scope=Scope(tokens=TokenScope.PROMPT), saes=saes), plan(e, scope=Scope(tokens=TokenScope.GENERATED), saes=saes), None]
    ids = ids_of(3, 5, 10)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with SteeringContext(llama, saes, plans, auto_phase=True):
            gen = llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, 5:]
        with SteeringContext(llama, saes, plans) as ctx:
            logits = greedy(llama, ids, mask, ctx, steps=3)
        plain = llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(gen, logits.argmax(-1))
    assert gen[1, 0] == plain[1, 0]  # a generated-only edit cannot change the first new token
    assert torch.equal(gen[2], plain[2])


def test_rows_map_a_smaller_or_permuted_batch_to_plan_rows(llama, lm_saes):
    """A forward may carry a subset of the plan rows in any order (e.g. finished rows dropped)."""
    saes = {"r0": lm_saes["r0"]}
    plans = [plan(edit("r0", EditOp.SET, [1], 3.0), saes=saes), None, plan(edit("r0", EditOp.ABLATE, [2, 3, 4]), saes=saes)]
    ids = ids_of(3, 5, 11)
    with torch.no_grad():
        with SteeringContext(llama, saes, plans, ReadoutSpec(("r0",), 3)) as ctx:
            ctx.prefill()
            full = llama(ids).logits
        with SteeringContext(llama, saes, plans, ReadoutSpec(("r0",), 3)) as sub:
            sub.prefill(rows=[2, 0])
            part = llama(ids[[2, 0]]).logits
            sub.prefill(rows=[5])
            with pytest.raises(InvalidArgument):
                llama(ids[:1])
    torch.testing.assert_close(part, full[[2, 0]], atol=1e-5, rtol=0)
    a, b = ctx.readouts(), sub.readouts()
    for r in (0, 2):
        assert torch.equal(a[r]["r0"].prompt.after.indices, b[r]["r0"].prompt.after.indices)
    assert b[1]["r0"].prompt is None  # row 1 never ran in ``sub``
