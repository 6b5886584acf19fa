"""Projection edits (project_set / project_cap) along a latent's unit decoder direction, against a
hand computation on the activation the hook sees; and their validation."""

from __future__ import annotations


import pytest
import torch

from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import Condition, EditOp, InterventionPlan, LatentEdit
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext
from tests.sae_runtime.steering_helpers import D, make_sae, probe, resolve, tiny_llama
from tests.sae_runtime.steering_helpers import jumprelu_by_hand as by_hand







@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama-proj"), seed=6, num_layers=2)


@pytest.fixture(scope="module")
def saes():
    return {"p": AttachedSae("p", make_sae("jumprelu", D, 48, 51), HookSite.parse("blocks.1.hook_resid_pre"))}






def run(llama, saes, plans, ids):
    with torch.no_grad(), SteeringContext(llama, saes, plans) as ctx:
        ctx.prefill()
        with probe(llama.model.layers[1], inputs=True) as log:
            llama(ids)
    return log["before"][0], log["after"][0]


def project_by_hand(x, u, v, cap):
    """x - c u + t u with c = <x, u>, t = v (set) or min(c, v) (cap); u a unit vector."""
    c = (x * u).sum(-1, keepdim=True)
    t = torch.minimum(c, torch.tensor(v)) if cap else torch.full_like(c, v)
    return x - c * u + t * u


def test_project_set_and_cap_match_the_hand_formula_latent_by_latent_in_order(llama, saes):
    sae = saes["p"].sae
    ids = torch.randint(5, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    unit = lambda i: sae.W_dec[i].detach() / sae.W_dec[i].detach().norm()  # noqa: E731
    p_set = resolve(InterventionPlan((LatentEdit("p", EditOp.PROJECT_SET, (3, 8), 1.25),)), saes)
    p_cap = resolve(InterventionPlan((LatentEdit("p", EditOp.PROJECT_CAP, (2,), 0.0), LatentEdit("p", EditOp.PROJECT_SET, (3,), -0.5))), saes)
    x, hooked_set = run(llama, saes, [p_set, p_set], ids)
    want = project_by_hand(project_by_hand(x, unit(3), 1.25, False), unit(8), 1.25, False)
    torch.testing.assert_close(hooked_set, want, atol=1e-5, rtol=0)
    # The last projection's component is exactly its value.
    torch.testing.assert_close((hooked_set * unit(8)).sum(-1), torch.full((2, 7), 1.25), atol=1e-5, rtol=0)
    x, hooked_cap = run(llama, saes, [p_cap, p_cap], ids)
    want = project_by_hand(project_by_hand(x, unit(2), 0.0, True), unit(3), -0.5, False)
    torch.testing.assert_close(hooked_cap, want, atol=1e-5, rtol=0)
    c = (x * unit(2)).sum(-1)
    assert (c > 0).any() and (c <= 0).any()  # the cap both bites and leaves some positions alone


def test_affine_edits_come_first_then_projections_and_a_conditional_projection(llama, saes):
    """At one SAE: set latent 5 (error term kept), then project_cap on latent 9 where latent 5 of the
    unedited activation is above a threshold."""
    sae = saes["p"].sae
    ids = torch.randint(5, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    x0, _ = run(llama, saes, [None], ids)
    f = by_hand(sae, x0)
    lat = int((f[0] > 0).sum(0).argmax())
    vals = f[0, :, lat].unique().sort().values
    thr = float((vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2)
    cond = f[..., lat] > thr
    assert cond.any() and not cond.all()
    p = resolve(InterventionPlan((LatentEdit("p", EditOp.SET, (5,), 2.0),
                                  LatentEdit("p", EditOp.PROJECT_CAP, (9,), -0.2, condition=Condition("p", lat, threshold=thr)))), saes)
    x, hooked = run(llama, saes, [p], ids)
    after_set = x + (2.0 - f[..., 5:6]) * sae.W_dec[5]
    u = sae.W_dec[9].detach() / sae.W_dec[9].detach().norm()
    want = torch.where(cond.unsqueeze(-1), project_by_hand(after_set, u, -0.2, True), after_set)
    torch.testing.assert_close(hooked, want, atol=1e-5, rtol=0)


def test_without_the_error_term_projections_act_on_the_reconstruction(llama, saes):
    sae = saes["p"].sae
    ids = torch.randint(5, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    p = resolve(InterventionPlan((LatentEdit("p", EditOp.ABLATE, (1,)), LatentEdit("p", EditOp.PROJECT_SET, (4,), 0.7)),
                                 preserve_error=False), saes)
    x, hooked = run(llama, saes, [p], ids)
    f = by_hand(sae, x)
    f[..., 1] = 0
    recon = f @ sae.W_dec + sae.b_dec
    u = sae.W_dec[4].detach() / sae.W_dec[4].detach().norm()
    torch.testing.assert_close(hooked, project_by_hand(recon, u, 0.7, False), atol=1e-5, rtol=0)


def test_projection_validation(saes):
    plain = {"p": saes["p"].sae}
    with pytest.raises(InvalidArgument) as err:
        InterventionPlan((LatentEdit("p", EditOp.PROJECT_SET, (1,), float("nan")),)).resolve(plain)
    assert err.value.field == "plan.edits[0].value"
    with pytest.raises(InvalidArgument) as err:
        InterventionPlan((LatentEdit("p", EditOp.PROJECT_CAP, (1,), 1.0, normalize=True),)).resolve(plain)
    assert err.value.field == "plan.edits[0].normalize"
    r = InterventionPlan((LatentEdit("p", EditOp.PROJECT_CAP, (1, 4), 1.0),)).resolve(plain)
    assert r.edits[0].op is EditOp.PROJECT_CAP and r.edits[0].latents == (1, 4)
