"""Conditional edits and stop_when in SteeringContext, checked against hand computations on the
unhooked activations (SAE latents written out by hand), and each row against its solo run."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.plan import Compare, Condition, EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, TokenScope, VectorEdit
from sae_runtime.saes import SaeConfig, build_sae
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext
from tests.sae_runtime.steering_helpers import D, greedy, make_sae, probe, resolve, tiny_llama
from tests.sae_runtime.steering_helpers import jumprelu_by_hand as by_hand







@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"), seed=5, num_layers=3)


@pytest.fixture(scope="module")
def saes():
    return {
        "e0": AttachedSae("e0", make_sae("jumprelu", D, 64, 41), HookSite.parse("blocks.0.hook_resid_post")),
        "r1": AttachedSae("r1", make_sae("jumprelu", D, 80, 42), HookSite.parse("blocks.1.hook_resid_post")),
    }




def ids_of(batch, length, seed):
    return torch.randint(5, 128, (batch, length), generator=torch.Generator().manual_seed(seed))




def unhooked_outputs(model, ids, layers):
    """Outputs of the given decoder layers in a plain forward (no steering)."""
    with torch.no_grad(), probe(model.model.layers[layers[0]]) as a, probe(model.model.layers[layers[-1]]) as b:
        model(ids)
    return a["before"][0], b["before"][0]


def split(values, q=0.5):
    """A threshold between two neighbouring distinct values near quantile ``q`` (never equal to one,
    so rounding in the hooked encode cannot flip a comparison)."""
    v = values.reshape(-1).unique().sort().values
    k = min(max(int(q * (len(v) - 1)), 0), len(v) - 2)
    return float((v[k] + v[k + 1]) / 2)


def busy_latent(f, rank=0):
    """The latent active at the ``rank``-th most positions, and a threshold splitting its values."""
    flat = f.reshape(-1, f.shape[-1])
    i = int((flat > 0).sum(0).argsort(descending=True, stable=True)[rank])
    return i, split(flat[:, i])


def clamp_expected(x, sae, f, latents, v, cond):
    delta = sum((v - f[..., i:i + 1]) * sae.W_dec[i] for i in latents)
    return x + cond.unsqueeze(-1).to(x.dtype) * delta


def test_a_same_site_conditional_clamp_edits_exactly_where_the_condition_holds(llama, saes):
    sae = saes["r1"].sae
    ids = ids_of(2, 9, 1)
    _, x1 = unhooked_outputs(llama, ids, [0, 1])
    f = by_hand(sae, x1)
    lat, thr = busy_latent(f)
    cond = f[..., lat] > thr
    assert cond.any() and not cond.all()
    p = resolve(InterventionPlan((LatentEdit("r1", EditOp.SET, (3, 7), 2.5, condition=Condition("r1", lat, threshold=thr)),)), saes)
    with torch.no_grad(), SteeringContext(llama, {"r1": saes["r1"]}, [p, p]) as ctx:
        ctx.prefill()
        with probe(llama.model.layers[1]) as log:
            llama(ids)
    x, hooked = log["before"][0], log["after"][0]
    assert torch.equal(x, x1)
    torch.testing.assert_close(hooked, clamp_expected(x, sae, f, (3, 7), 2.5, cond), atol=1e-5, rtol=0)
    moved = (hooked - x).abs().amax(-1) > 0
    assert torch.equal(moved, cond)
    assert torch.equal(hooked[~cond], x[~cond])  # positions where it fails are bit-identical


def test_a_condition_on_an_earlier_layer_and_and_or_trees(llama, saes):
    """Edit at layer 1 gated by e0 latents (layer 0 output): below, above, AND and OR of them."""
    e0, r1 = saes["e0"].sae, saes["r1"].sae
    ids = ids_of(3, 8, 2)
    x0, x1 = unhooked_outputs(llama, ids, [0, 1])
    f0, f1 = by_hand(e0, x0), by_hand(r1, x1)
    a, ta = busy_latent(f0)
    b, tb = busy_latent(f0, rank=1)
    la, lb = Condition("e0", a, threshold=ta), Condition("e0", b, compare=Compare.BELOW, threshold=tb)
    ca, cb = f0[..., a] > ta, f0[..., b] < tb
    trees = [
        (la, ca),
        (Condition(all_of=(la, lb)), ca & cb),
        (Condition(any_of=(la, lb)), ca | cb),
        (Condition(any_of=(Condition(all_of=(la, lb)), Condition("e0", a, compare=Compare.BELOW, threshold=split(f0[..., a], 0.3)))),
         (ca & cb) | (f0[..., a] < split(f0[..., a], 0.3))),
    ]
    plans = [resolve(InterventionPlan((LatentEdit("r1", EditOp.ADD, (5,), 1.5, condition=t),)), saes) for t, _ in trees]
    for (_, want), p in zip(trees, plans):
        assert want.any() and not want.all()
        with torch.no_grad(), SteeringContext(llama, saes, [p] * 3) as ctx:
            ctx.prefill()
            with probe(llama.model.layers[1]) as log:
                llama(ids)
        x, hooked = log["before"][0], log["after"][0]
        expected = x + want.unsqueeze(-1) * (1.5 * r1.W_dec[5])
        torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)
        assert torch.equal((hooked - x).abs().amax(-1) > 0, want)
    del f1


def test_conditions_are_read_before_edits_at_their_site(llama, saes):
    """A clamp of the condition's own latent (at the same site) does not change where it holds:
    conditions read the latents as the activation enters the site."""
    sae = saes["e0"].sae
    ids = ids_of(1, 10, 3)
    x0, _ = unhooked_outputs(llama, ids, [0, 0])
    f = by_hand(sae, x0)
    lat, thr = busy_latent(f)
    cond = f[..., lat] > thr
    p = resolve(InterventionPlan((
        LatentEdit("e0", EditOp.SET, (lat,), 10 * thr + 5.0),  # unconditional: every position above thr after it
        LatentEdit("e0", EditOp.ABLATE, (1, 2), condition=Condition("e0", lat, threshold=thr)),
    )), saes)
    with torch.no_grad(), SteeringContext(llama, saes, [p]) as ctx:
        ctx.prefill()
        with probe(llama.model.layers[0]) as log:
            llama(ids)
    x, hooked = log["before"][0], log["after"][0]
    delta = (10 * thr + 5.0 - f[..., lat:lat + 1]) * sae.W_dec[lat]
    delta = delta + cond.unsqueeze(-1) * sum((0 - f[..., i:i + 1]) * sae.W_dec[i] for i in (1, 2))
    torch.testing.assert_close(hooked, x + delta, atol=1e-5, rtol=0)



class _NoCtx:
    def prefill(self, *a):
        pass

    def decode(self, *a):
        pass

    def stop_hits(self):
        return {}


def test_mixed_rows_conditional_projection_vector_plain_equal_their_solo_runs(llama, saes):
    cond = Condition(any_of=(Condition("e0", 3, threshold=0.1), Condition("r1", 9, compare=Compare.BELOW, threshold=0.05)))
    vec = tuple(float(v) for v in torch.randn(D, generator=torch.Generator().manual_seed(7)) * 0.3)
    plans = [
        resolve(InterventionPlan((LatentEdit("r1", EditOp.SET, (1, 2), 3.0, condition=cond),)), saes),
        None,
        resolve(InterventionPlan((LatentEdit("e0", EditOp.PROJECT_CAP, (4, 5), 0.1),
                                  LatentEdit("r1", EditOp.PROJECT_SET, (6,), 1.0, condition=Condition("e0", 3, threshold=0.1)))), saes),
        resolve(InterventionPlan(vectors=(VectorEdit(values=vec, site="blocks.2.hook_resid_pre", value=2.0),
                                          VectorEdit(values=vec, site="blocks.0.hook_resid_post", op=EditOp.PROJECT_SET, value=-0.5,
                                                     condition=Condition("e0", 3, threshold=0.1))),
                                 scope=Scope(tokens=TokenScope.GENERATED)), saes),
        resolve(InterventionPlan((LatentEdit("r1", EditOp.SCALE, (9, 10), 2.0),)), saes),
        InterventionPlan(),
        resolve(InterventionPlan(stop_when=Condition("r1", 9, threshold=0.0)), saes),
    ]
    lengths = [5, 7, 4, 7, 6, 3, 5]
    rows = [ids_of(1, n, 200 + r) for r, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - row.shape[1]:], mask[r, width - row.shape[1]:] = row[0], 1
    with torch.no_grad():
        with SteeringContext(llama, saes, plans) as ctx:
            batched = greedy(llama, ids, mask, ctx, steps=3)
        for r in range(len(rows)):
            with SteeringContext(llama, saes, [plans[r]]) as ctx:
                alone = greedy(llama, rows[r], torch.ones_like(rows[r]), ctx, steps=3)
            torch.testing.assert_close(batched[r], alone[0], atol=1e-5, rtol=0)
        base = greedy(llama, ids, mask, _NoCtx(), steps=3)
    for r in (1, 5, 6):  # no plan, an empty plan, a plan that only reads (stop_when)
        assert torch.equal(batched[r], base[r])
    for r in (0, 2, 3, 4):
        assert (batched[r] - base[r]).abs().max() > 1e-4


def test_stop_hits_report_the_first_position_and_leaf_where_the_condition_holds(llama, saes):
    """Decode forwards of several positions (and one of one): per row, the first valid position
    where stop_when holds and the first true leaf of the tree there, computed by hand."""
    e0 = saes["e0"].sae
    ids = ids_of(3, 6, 4)
    chunk = ids_of(3, 5, 5)
    with torch.no_grad(), probe(llama.model.layers[0]) as log:
        out = llama(ids, use_cache=True)
        llama(chunk, past_key_values=out.past_key_values, use_cache=True)
    f = by_hand(e0, log["before"][1])  # (3, 5, 64) latents on the chunk's positions
    a, ta = busy_latent(f)
    b, _ = busy_latent(f, rank=1)
    tb = split(f[..., b], 0.75)
    la, lb = Condition("e0", a, threshold=ta), Condition("e0", b, threshold=tb)
    trees = [la, Condition(any_of=(lb, la)), Condition(all_of=(la, lb))]
    holds = [f[..., a] > ta, (f[..., b] > tb) | (f[..., a] > ta), (f[..., a] > ta) & (f[..., b] > tb)]
    plans = [resolve(InterventionPlan(stop_when=t), saes) for t in trees] + [None]
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[0, 0] = False  # a masked position is never a hit
    with torch.no_grad(), SteeringContext(llama, saes, plans) as ctx:
        ctx.prefill()
        out = llama(torch.cat([ids, ids[:1]]), use_cache=True)
        assert ctx.stop_hits() == {}  # prefill forwards never stop
        ctx.decode(valid)
        llama(torch.cat([chunk, chunk[:1]]), past_key_values=out.past_key_values, use_cache=True)
        hits = ctx.stop_hits()
        ctx.decode()
        assert ctx.stop_hits() == {}  # cleared by set_phase
    for r in range(3):
        h = holds[r][r] & valid[r]
        if not h.any():
            assert r not in hits
            continue
        pos = int(h.nonzero()[0, 0])
        first = next(leaf for leaf in trees[r].leaves() if float(f[r, pos, leaf.latent]) > leaf.threshold)
        got = hits[r]
        assert got[:3] == (pos, "e0", first.latent)
        assert got[3] == pytest.approx(float(f[r, pos, first.latent]), abs=1e-5)
    assert 3 not in hits
    assert len(hits) >= 2


def test_stop_hits_on_greedy_decode_steps_match_the_hand_condition(llama, saes):
    """One generated token per forward: the step where the condition first holds, row by row."""
    e0 = saes["e0"].sae
    ids = ids_of(2, 5, 6)
    mask = torch.ones_like(ids)
    with torch.no_grad(), probe(llama.model.layers[0]) as log:
        greedy(llama, ids, mask, _NoCtx(), steps=6)
    f = by_hand(e0, torch.cat(log["before"][1:], 1))  # (2, 6, 64): generated positions
    lat, thr = busy_latent(f)
    plans = [resolve(InterventionPlan(stop_when=Condition("e0", lat, threshold=thr)), saes)] * 2
    hits: list = []
    with torch.no_grad(), SteeringContext(llama, saes, plans) as ctx:
        greedy(llama, ids, mask, ctx, steps=6, hits=hits)
    for r in range(2):
        want = [s for s in range(6) if f[r, s, lat] > thr]
        got = [s for s in range(6) if r in hits[s]]
        assert got == want
        for s in got:
            assert hits[s][r][:3] == (0, "e0", lat)


# -- through the engine --------------------------------------------------------------------------


def test_engine_rows_mixing_conditional_projection_vector_and_plain_edits_equal_their_solo_runs(tmp_path):
    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec
    from sae_runtime.backends.types import SamplingParams, TextRequest
    from sae_runtime.formats import save_native

    model_dir = build_tiny_causal_lm(tmp_path / "lm", "llama", seed=0, init_std=0.2)
    torch.manual_seed(1)
    sae = build_sae(SaeConfig("jumprelu", D, 64, hook_name="blocks.0.hook_resid_post"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0.0, 0.3)
        sae.threshold.fill_(0.2)
    save_native(sae, tmp_path / "sae")
    spec = ModelSpec(name="lm", kind="causal_lm", path=str(model_dir), saes=(SaeSpec("s", str(tmp_path / "sae")),),
                     limits=Limits(max_prompt_tokens=32, max_new_tokens=16))
    backend = CausalLmBackend.from_spec(spec)
    vec = tuple(float(v) for v in torch.randn(D, generator=torch.Generator().manual_seed(3)))
    plans = [
        InterventionPlan((LatentEdit("s", EditOp.SET, (3, 7), 4.0, condition=Condition("s", 5, threshold=0.3)),)),
        InterventionPlan((LatentEdit("s", EditOp.PROJECT_SET, (2,), 3.0),)),
        InterventionPlan(vectors=(VectorEdit(values=vec, site="blocks.1.hook_resid_post", value=4.0),
                                  VectorEdit(values=vec, site="blocks.0.hook_resid_post", op=EditOp.PROJECT_CAP, value=0.0,
                                             condition=Condition(any_of=(Condition("s", 1, threshold=0.2), Condition("s", 4, threshold=0.2)))))),
        InterventionPlan((LatentEdit("s", EditOp.ABLATE, (0, 4)),)),
        InterventionPlan(),
    ]
    prompts = ("the cat is red and the dog", "a bird", "where is the big house", "one two three four five six", "red")
    requests = [TextRequest(prompt=pr, plan=pl, include_default=True, sampling=SamplingParams(max_new_tokens=6 + i))
                for i, (pr, pl) in enumerate(zip(prompts, plans))]
    solo = [backend.generate([r])[0] for r in requests]
    runs = [backend.engine.submit(backend.validate(r)) for r in requests]
    backend.engine.wait(runs)
    for run, want in zip(runs, solo):
        got = run.result
        assert [t.id for t in got.steered.tokens] == [t.id for t in want.steered.tokens]
        assert [t.id for t in got.default.tokens] == [t.id for t in want.default.tokens]
    changed = [[t.id for t in s.steered.tokens] != [t.id for t in s.default.tokens] for s in solo]
    assert changed == [True, True, True, True, False]  # every edit moves its tokens; the empty plan none


def test_unet_same_site_conditional_add_on_both_cfg_halves(tmp_path):
    """U-Net blocks take conditions on the same block: the add lands exactly on the spatial
    positions (of each CFG half) where the block update's latent is above the threshold."""
    from diffusers import UNet2DConditionModel

    from sae_runtime.demo.tiny_models import build_tiny_unet

    unet = UNet2DConditionModel.from_pretrained(build_tiny_unet(tmp_path / "unet", seed=3)).eval()
    site = HookSite.parse("unet.down_blocks.1.attentions.0")
    att = {"d1": AttachedSae("d1", make_sae("jumprelu", 64, 128, 31), site)}
    sae = att["d1"].sae
    block = unet.down_blocks[1].attentions[0]
    sample = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # [uncond x2, cond x2]
    text = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(1))
    log: dict = {}

    @contextmanager
    def probed():
        hooks = [block.register_forward_pre_hook(lambda m, a, k: log.__setitem__("in", (a[0] if a else k["hidden_states"]).clone()),
                                                 with_kwargs=True),
                 block.register_forward_hook(lambda m, a, o: log.__setitem__("before", o[0].clone()), prepend=True),
                 block.register_forward_hook(lambda m, a, o: log.__setitem__("after", o[0].clone()))]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    with torch.no_grad():
        with probed():
            unet(sample, 10, encoder_hidden_states=text)
        update = (log["before"] - log["in"]).permute(0, 2, 3, 1).reshape(4, -1, 64)
        f = by_hand(sae, update)
        lat, thr = busy_latent(f)
        cond = f[..., lat] > thr
        assert cond.any() and not cond.all()
        p = resolve(InterventionPlan((LatentEdit("d1", EditOp.ADD, (3, 8), 2.0, condition=Condition("d1", lat, threshold=thr)),)), att)
        with SteeringContext(unet, att, [p, None]) as ctx:
            ctx.set_unet_step(0, 1, cfg_doubled=True)
            with probed():
                unet(sample, 10, encoder_hidden_states=text)
    delta = (log["after"] - log["before"]).permute(0, 2, 3, 1).reshape(4, -1, 64)
    want = cond.unsqueeze(-1) * (2.0 * (sae.W_dec[3] + sae.W_dec[8]))
    for j in (0, 2):  # plan row 0 in the uncond and the cond half
        torch.testing.assert_close(delta[j], want[j].detach(), atol=1e-5, rtol=0)
    assert (delta[1] == 0).all() and (delta[3] == 0).all()  # plan row 1 (None) untouched in both halves


def test_vision_conditional_edit_reads_an_earlier_vision_layer(tmp_path):
    """LLaVA vision tower: an edit at vision layer 1 gated by a latent of an SAE at vision layer 0,
    per image token; the other row (no plan) and the language model's rows stay as unhooked."""
    from transformers import LlavaForConditionalGeneration

    from sae_runtime.demo.tiny_models import build_tiny_llava

    llava = LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path / "llava", seed=4)).eval()
    att = {"v0": AttachedSae("v0", make_sae("jumprelu", 32, 64, 21), HookSite.parse("vision.layers.0")),
           "v1": AttachedSae("v1", make_sae("jumprelu", 32, 64, 22), HookSite.parse("vision.layers.1"))}
    layers = llava.model.vision_tower.encoder.layers
    ids = torch.tensor([[1] + [llava.config.image_token_id] * 16 + [20, 21, 22]] * 2)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with probe(layers[0]) as l0:
            base = llava(input_ids=ids, pixel_values=pixels).logits
        f0 = by_hand(att["v0"].sae, l0["before"][0])
        lat, thr = busy_latent(f0)
        cond = f0[..., lat] > thr
        assert cond[0].any() and not cond[0].all()
        p = resolve(InterventionPlan((LatentEdit("v1", EditOp.SET, (2, 5), 3.0, condition=Condition("v0", lat, threshold=thr)),)), att)
        with SteeringContext(llava, att, [p, None]) as ctx:
            ctx.prefill()
            with probe(layers[1]) as l1:
                out = llava(input_ids=ids, pixel_values=pixels).logits
    x, hooked = l1["before"][0], l1["after"][0]
    f1 = by_hand(att["v1"].sae, x)
    want = clamp_expected(x, att["v1"].sae, f1, (2, 5), 3.0, cond)
    torch.testing.assert_close(hooked[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(hooked[1], x[1]) and torch.equal(out[1], base[1])
    assert (out[0] - base[0]).abs().max() > 1e-4


def test_a_read_topk_sae_with_a_condition_encodes_what_enters_it(llama):
    """Two SAEs at one site: ``a`` clamps first, then the TopK SAE ``t`` (read, so its full encoding
    is computed anyway) clamps where its own latent is above a threshold. The condition reads t's
    latents of the activation entering the site; t's edit and readout use x after a's edit."""
    site = HookSite.parse("blocks.1.hook_resid_post")
    a = AttachedSae("a", make_sae("jumprelu", D, 48, 51), site)
    t = AttachedSae("t", make_sae("topk", D, 64, 52, k=8), site)
    both = {"a": a, "t": t}
    ids = ids_of(2, 7, 3)
    _, x_in = unhooked_outputs(llama, ids, [0, 1])
    with torch.no_grad():
        f_in = t.sae.encode(x_in)
        lat, thr = busy_latent(f_in)
        cond = f_in[..., lat] > thr
        x_a = x_in + (3.0 - by_hand(a.sae, x_in)[..., 2:3]) * a.sae.W_dec[2]
        f_a = t.sae.encode(x_a)
        expected = x_a + cond.unsqueeze(-1) * (1.5 - f_a[..., 5:6]) * t.sae.W_dec[5]
    assert cond.any() and not cond.all()
    plan = resolve(InterventionPlan((LatentEdit("a", EditOp.SET, (2,), 3.0),
                                     LatentEdit("t", EditOp.SET, (5,), 1.5, condition=Condition("t", lat, threshold=thr)))), both)
    with torch.no_grad(), SteeringContext(llama, both, [plan, plan], ReadoutSpec(("t",), top_k=8)) as ctx:
        ctx.prefill()
        with probe(llama.model.layers[1]) as log:
            llama(ids)
    torch.testing.assert_close(log["after"][0], expected, atol=1e-5, rtol=0)
    before = ctx.readouts()[0]["t"].prompt.before
    top = f_a[0].topk(8, dim=-1)
    torch.testing.assert_close(before.values, top.values, atol=1e-5, rtol=0)
