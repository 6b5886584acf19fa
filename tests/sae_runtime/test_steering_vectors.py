"""Steering vectors (inline and declared) against hand formulas; InterventionPlan.resolve for
vectors, presets, describe and conditions; the hooked sites following set_plans."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from sae_runtime.errors import InvalidArgument, NotFound, TooLarge
from sae_runtime.plan import Compare, Condition, EditOp, InterventionPlan, LatentEdit, Scope, TokenScope, VectorEdit
from sae_runtime.saes import SaeConfig, build_sae
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext
from sae_runtime.vectors import load_vector
from tests.sae_runtime.steering_helpers import probe, tiny_llama

D = 32


def make_sae(d_sae: int, seed: int, d_in: int = D) -> torch.nn.Module:
    sae = build_sae(SaeConfig("jumprelu", d_in, d_sae)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.2 if name == "threshold" else torch.randn(p.shape, generator=g) * 0.3)
    return sae


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama-vec"), seed=7, num_layers=3)


@pytest.fixture(scope="module")
def saes():
    return {"a": AttachedSae("a", make_sae(40, 61), HookSite.parse("blocks.0.hook_resid_post")),
            "b": AttachedSae("b", make_sae(40, 62), HookSite.parse("blocks.2.hook_resid_post"))}


def direction(seed: int, width: int = D) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 0.5


def resolve(p, saes, **kw):
    return p.resolve({k: a.sae for k, a in saes.items()}, sae_sites={k: a.site for k, a in saes.items()},
                     site_width=lambda s: 2 * D if s.kind.value == "mlp_io" else D, **kw)




def hooked_at(llama, saes, plans, ids, layer=1):
    with torch.no_grad(), SteeringContext(llama, saes, plans) as ctx:
        ctx.prefill()
        with probe(llama.model.layers[layer]) as log:
            llama(ids)
    return log["before"][0], log["after"][0]


def test_vector_add_normalized_add_and_projections_at_a_site_with_no_sae(llama, saes):
    """blocks.1.hook_resid_post has no SAE: the site is hooked for the vectors alone."""
    d, e = direction(1), direction(2)
    ids = torch.randint(5, 128, (4, 6), generator=torch.Generator().manual_seed(3))
    site = "blocks.1.hook_resid_post"
    plans = [
        resolve(InterventionPlan(vectors=(VectorEdit(values=tuple(d.tolist()), site=site, value=1.5),)), saes),
        resolve(InterventionPlan(vectors=(VectorEdit(values=tuple(d.tolist()), site="layers.1", value=0.3, normalize=True),)), saes),
        resolve(InterventionPlan(vectors=(VectorEdit(values=tuple(d.tolist()), site=site, op=EditOp.PROJECT_SET, value=0.4),
                                          VectorEdit(values=tuple(e.tolist()), site=site, op=EditOp.PROJECT_CAP, value=0.0))), saes),
        None,
    ]
    assert plans[1].vectors[0].site == site and plans[1].vectors[0].values == ()
    x, hooked = hooked_at(llama, saes, plans, ids)
    ud, ue = d / d.norm(), e / e.norm()
    want0 = x[0] + 1.5 * d
    want1 = x[1] + 0.3 * x[1].norm(dim=-1, keepdim=True) * ud
    c = (x[2] * ud).sum(-1, keepdim=True)
    y = x[2] - c * ud + 0.4 * ud
    c2 = (y * ue).sum(-1, keepdim=True)
    want2 = y - c2 * ue + torch.minimum(c2, torch.tensor(0.0)) * ue
    for got, want in ((hooked[0], want0), (hooked[1], want1), (hooked[2], want2)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(hooked[3], x[3])
    assert (c2 > 0).any() and (c2 <= 0).any()


def test_a_declared_vector_from_safetensors_with_a_condition_and_a_generated_scope(llama, saes, tmp_path):
    d = direction(4)
    save_file({"v": d}, str(tmp_path / "v.safetensors"))
    declared = {"honest": load_vector("honest", str(tmp_path / "v.safetensors"), "blocks.2.hook_resid_post")}
    sae = saes["a"].sae
    ids = torch.randint(5, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), probe(llama.model.layers[0]) as log0:
        llama(ids)
        h = torch.einsum("...d,df->...f", log0["before"][0] - sae.b_dec, sae.W_enc) + sae.b_enc
        f = torch.where(h > sae.threshold, h.clamp_min(0), torch.zeros_like(h))
    lat = int((f[0] > 0).sum(0).argmax())
    vals = f[0, :, lat].unique().sort().values
    thr = float((vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2)
    cond = f[..., lat] > thr
    assert cond.any() and not cond.all()
    p = resolve(InterventionPlan(vectors=(VectorEdit(vector="honest", value=-2.0, condition=Condition("a", lat, threshold=thr)),)),
                saes, vectors=declared)
    assert p.vectors[0].site == "blocks.2.hook_resid_post" and torch.equal(p.vectors[0].direction, d)
    x, hooked = hooked_at(llama, saes, [p], ids, layer=2)
    torch.testing.assert_close(hooked, x + cond.unsqueeze(-1) * (-2.0 * d), atol=1e-5, rtol=0)
    # Generated scope: a prefill forward is untouched.
    gen = resolve(InterventionPlan(vectors=(VectorEdit(vector="honest", value=-2.0),), scope=Scope(tokens=TokenScope.GENERATED)),
                  saes, vectors=declared)
    x, hooked = hooked_at(llama, saes, [gen], ids, layer=2)
    assert torch.equal(x, hooked)


def test_hooked_sites_follow_set_plans_and_widths_are_checked_once(llama, saes, monkeypatch):
    calls = []
    real = HookSite.check_sae_width
    monkeypatch.setattr(HookSite, "check_sae_width", lambda self, *a: (calls.append(self), real(self, *a))[1])
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.modules())  # noqa: E731
    d = direction(8)
    ids = torch.randint(5, 128, (2, 5), generator=torch.Generator().manual_seed(9))
    vec = resolve(InterventionPlan(vectors=(VectorEdit(values=tuple(d.tolist()), site="blocks.1.hook_resid_post", value=1.0),)), saes)
    ctx = SteeringContext(llama, saes, [None, None], hook_all=True)
    with torch.no_grad():
        with ctx:
            assert count() == 2  # the two SAE sites
            ctx.set_plans({1: vec})  # a vector-only site joins while attached
            assert count() == 3
            with probe(llama.model.layers[1]) as log:
                llama(ids)
            ctx.set_plans({1: None})
            assert count() == 2
        for _ in range(3):
            with ctx:
                pass
    assert count() == 0
    assert len(calls) == 2  # once per SAE, not once per enter
    torch.testing.assert_close(log["after"][0][1], log["before"][0][1] + d, atol=1e-6, rtol=0)
    assert torch.equal(log["after"][0][0], log["before"][0][0])


# -- validation ----------------------------------------------------------------------------------


def test_vector_validation_errors_name_the_field(saes):
    d = tuple(direction(1).tolist())
    site = "blocks.1.hook_resid_post"

    def err(plan, kind, field, **kw):
        with pytest.raises(kind) as e:
            resolve(plan, saes, **kw)
        assert e.value.field == field, e.value

    err(InterventionPlan(vectors=(VectorEdit(values=d[:20], site=site),)), InvalidArgument, "plan.vectors[0].values")
    err(InterventionPlan(vectors=(VectorEdit(values=d, site=site),) * 3), TooLarge, "plan.vectors", max_inline_vector_dims=64)
    err(InterventionPlan(vectors=(VectorEdit(vector="nope"),)), NotFound, "plan.vectors[0].vector")
    err(InterventionPlan(vectors=(VectorEdit(values=d, site="blocks.1.hook_attn"),)), NotFound, "plan.vectors[0].site")
    err(InterventionPlan(vectors=(VectorEdit(values=d),)), InvalidArgument, "plan.vectors[0].site")
    err(InterventionPlan(vectors=(VectorEdit(vector="x", values=d, site=site),)), InvalidArgument, "plan.vectors[0].vector")
    err(InterventionPlan(vectors=(VectorEdit(values=d[:-1] + (float("inf"),), site=site),)), InvalidArgument, "plan.vectors[0].values")
    err(InterventionPlan(vectors=(VectorEdit(values=d, site=site, op=EditOp.SCALE),)), InvalidArgument, "plan.vectors[0].op")
    err(InterventionPlan(vectors=(VectorEdit(values=d, site=site, value=float("nan")),)), InvalidArgument, "plan.vectors[0].value")
    err(InterventionPlan(vectors=(VectorEdit(values=d, site=site, op=EditOp.PROJECT_SET, normalize=True),)), InvalidArgument,
        "plan.vectors[0].normalize")
    wide = {"w": load_vector_like("w", 48, "blocks.1.hook_resid_post")}
    err(InterventionPlan(vectors=(VectorEdit(vector="w"),)), InvalidArgument, "plan.vectors[0].vector", vectors=wide)
    err(InterventionPlan(vectors=(VectorEdit(vector="w", site="blocks.0.hook_resid_post"),)), InvalidArgument, "plan.vectors[0].site",
        vectors=wide)
    err(InterventionPlan(vectors=(VectorEdit(values=d, site=site),) * 3), TooLarge, "plan.edits", max_edits=2)


def load_vector_like(name, width, hook):
    from sae_runtime.vectors import SteeringVector

    return SteeringVector(name, HookSite.parse(hook), direction(3, width))


def test_presets_expand_first_and_unknown_ones_are_not_found(saes):
    d = tuple(direction(1).tolist())
    presets = {
        "calm": InterventionPlan((LatentEdit("a", EditOp.ABLATE, (1,)),), preserve_error=False,
                                 vectors=(VectorEdit(values=d, site="blocks.0.hook_resid_post"),)),
        "loud": InterventionPlan((LatentEdit("b", EditOp.SET, (2,), 3.0),)),
    }
    p = resolve(InterventionPlan((LatentEdit("a", EditOp.SCALE, (4,), 2.0),), presets=("loud", "calm")), saes, presets=presets)
    assert [(e.sae, e.op) for e in p.edits] == [("b", EditOp.SET), ("a", EditOp.ABLATE), ("a", EditOp.SCALE)]
    assert len(p.vectors) == 1 and p.presets == () and p.preserve_error is True and not p.is_empty
    assert not resolve(InterventionPlan(presets=("loud",)), saes, presets=presets).is_empty
    with pytest.raises(NotFound) as e:
        resolve(InterventionPlan(presets=("calm", "nope")), saes, presets=presets)
    assert e.value.field == "plan.presets[1]"
    bad = {"x": InterventionPlan((LatentEdit("zz", EditOp.ABLATE, (1,)),))}
    with pytest.raises(NotFound) as e:
        resolve(InterventionPlan(presets=("x",)), saes, presets=bad)
    assert e.value.field == "plan.presets[0].edits[0].sae"


def test_describe_appends_the_latents_it_resolves(saes):
    seen = []

    def describe(sae, text, top_n):
        seen.append((sae, text, top_n))
        return [7, 3, 9][:top_n]

    p = resolve(InterventionPlan((LatentEdit("a", EditOp.SET, (1,), 2.0, describe="the colour red", top_n=2),)), saes, describe=describe)
    assert p.edits[0].latents == (1, 7, 3) and seen == [("a", "the colour red", 2)]
    for top_n in (0, 65):
        with pytest.raises(InvalidArgument) as e:
            resolve(InterventionPlan((LatentEdit("a", EditOp.SET, (), 2.0, describe="red", top_n=top_n),)), saes, describe=describe)
        assert e.value.field == "plan.edits[0].top_n"
    with pytest.raises(InvalidArgument) as e:
        resolve(InterventionPlan((LatentEdit("a", EditOp.SET, (), 2.0, describe="red"),)), saes)
    assert e.value.field == "plan.edits[0].describe"
    with pytest.raises(InvalidArgument) as e:
        resolve(InterventionPlan((LatentEdit("a", EditOp.SET, (), 2.0, describe="red"),)), saes, describe=lambda *a: [99])
    assert e.value.field == "plan.edits[0].describe"


def test_condition_validation(saes):
    saes["a"].sae.labels["calm"] = 6
    edit = lambda c, sae="b": InterventionPlan((LatentEdit(sae, EditOp.SET, (1,), 1.0, condition=c),))  # noqa: E731
    ok = resolve(edit(Condition(any_of=(Condition("a", label="calm"), Condition("b", 2, compare=Compare.BELOW, threshold=1)))), saes)
    leaf = ok.edits[0].condition.any_of[0]
    assert leaf.latent == 6 and leaf.label == "" and ok.edits[0].condition.any_of[1].compare is Compare.BELOW

    def err(plan, kind, field):
        with pytest.raises(kind) as e:
            resolve(plan, saes)
        assert e.value.field == field, e.value

    f = "plan.edits[0].condition"
    err(edit(Condition("zz", 1)), NotFound, f"{f}.sae")
    err(edit(Condition("a")), InvalidArgument, f"{f}.latent")
    err(edit(Condition("a", 1, label="calm")), InvalidArgument, f"{f}.latent")
    err(edit(Condition("a", label="nope")), NotFound, f"{f}.label")
    err(edit(Condition("a", 99)), InvalidArgument, f"{f}.latent")
    err(edit(Condition("a", 1, threshold=float("inf"))), InvalidArgument, f"{f}.threshold")
    err(edit(Condition("a", 1, compare="equal")), InvalidArgument, f"{f}.compare")
    err(edit(Condition("a", 1, all_of=(Condition("a", 2),))), InvalidArgument, f"{f}.sae")
    err(edit(Condition(all_of=(Condition("a", 2),), any_of=(Condition("a", 3),))), InvalidArgument, f"{f}.any_of")
    err(edit(Condition(all_of=(Condition("a", 2), Condition("zz", 1)))), NotFound, f"{f}.all_of[1].sae")
    deep = Condition("a", 1)
    for _ in range(4):
        deep = Condition(all_of=(deep,))
    err(edit(deep), InvalidArgument, f)
    # An SAE at a later layer than the edited site is not computed yet.
    err(edit(Condition("b", 1), sae="a"), InvalidArgument, f"{f}.sae")
    err(InterventionPlan(vectors=(VectorEdit(values=tuple(direction(1).tolist()), site="blocks.1.hook_resid_post",
                                             condition=Condition("b", 1)),)), InvalidArgument, "plan.vectors[0].condition.sae")
    # stop_when leaves sit at text sites.
    vision = {**saes, "v": AttachedSae("v", make_sae(40, 63), HookSite.parse("vision.layers.0"))}
    with pytest.raises(InvalidArgument) as e:
        resolve(InterventionPlan(stop_when=Condition("v", 1)), vision)
    assert e.value.field == "plan.stop_when.sae"
    # Vision tokens and text tokens are different positions: no condition across them.
    with pytest.raises(InvalidArgument):
        resolve(edit(Condition("v", 1)), vision)
    assert resolve(InterventionPlan(stop_when=Condition("b", 1)), saes).is_empty


def test_site_order():
    s = HookSite.parse
    assert s("blocks.1.hook_resid_post").readable_from(s("blocks.1.hook_resid_pre"))
    assert s("blocks.1.hook_resid_post").readable_from(s("blocks.1.hook_mlp_out"))
    assert s("blocks.2.hook_resid_pre").readable_from(s("blocks.1.hook_resid_post"))
    assert not s("blocks.1.hook_mlp_out").readable_from(s("blocks.1.hook_mlp_io"))
    assert not s("blocks.1.hook_resid_pre").readable_from(s("blocks.1.hook_resid_post"))
    assert s("vision.layers.2").readable_from(s("vision.layers.0"))
    assert not s("blocks.0.hook_resid_pre").readable_from(s("vision.layers.0"))
    assert s("unet.mid_block.attentions.0").readable_from(s("unet.mid_block.attentions.0"))
    assert not s("unet.up_blocks.0.attentions.0").readable_from(s("unet.down_blocks.1.attentions.0"))


def test_resolving_a_resolved_plan_gives_the_same_plan(saes, tmp_path):
    d = direction(5)
    declared = {"v": load_vector_like("v", D, "blocks.1.hook_resid_post")}
    saes["b"].sae.labels["loud"] = 11
    p = InterventionPlan((LatentEdit("b", EditOp.SET, (1,), 2.0, labels=("loud",), describe="x", top_n=1,
                                     condition=Condition(any_of=(Condition("a", 6), Condition("b", label="loud")))),),
                         vectors=(VectorEdit(values=tuple(d.tolist()), site="layers.1", op=EditOp.PROJECT_CAP, value=0.5),
                                  VectorEdit(vector="v", value=2.0)),
                         stop_when=Condition("b", 2))
    once = resolve(p, saes, vectors=declared, describe=lambda *a: [4])
    twice = resolve(once, saes)
    assert once == twice and once.edits[0].latents == (1, 11, 4) and once.edits[0].describe == ""
    for a, b in zip(once.vectors, twice.vectors):
        assert torch.equal(a.direction, b.direction)
