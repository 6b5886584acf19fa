"""InterventionPlan validation: labels resolve, bad input raises a typed error naming the field."""

import math

import pytest
import torch

from sae_runtime.errors import InvalidArgument, NotFound, TooLarge
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, TokenScope
from sae_runtime.saes import SaeConfig, build_sae


@pytest.fixture()
def saes():
    sae = build_sae(SaeConfig(architecture="jumprelu", d_in=8, d_sae=16))
    sae.labels = {"color:red": 3, "animal:fox": 7}
    return {"res": sae}


def test_labels_resolve_to_indices_and_duplicates_collapse(saes):
    plan = InterventionPlan(edits=(LatentEdit(sae="res", op="set", latents=(3, 5), labels=("color:red",), value=8),))
    resolved = plan.resolve(saes)
    (edit,) = resolved.edits
    assert edit.latents == (3, 5)
    assert edit.op is EditOp.SET and edit.labels == ()
    assert resolved.scope.tokens is TokenScope.ALL


@pytest.mark.parametrize(
    ("edit", "error", "field"),
    [
        (LatentEdit(sae="nope", op="set", latents=(1,)), NotFound, "plan.edits[0].sae"),
        (LatentEdit(sae="res", op="set", latents=(-1,)), InvalidArgument, "plan.edits[0].latents"),
        (LatentEdit(sae="res", op="set", latents=(16,)), InvalidArgument, "plan.edits[0].latents"),
        (LatentEdit(sae="res", op="set", latents=(1,), value=math.nan), InvalidArgument, "plan.edits[0].value"),
        (LatentEdit(sae="res", op="add", latents=(1,), value=math.inf), InvalidArgument, "plan.edits[0].value"),
        (LatentEdit(sae="res", op="set", labels=("color:blue",)), NotFound, "plan.edits[0].labels"),
        (LatentEdit(sae="res", op="explode", latents=(1,)), InvalidArgument, "plan.edits[0].op"),
        (LatentEdit(sae="res", op="set", latents=(1,), normalize=True), InvalidArgument, "plan.edits[0].normalize"),
        (LatentEdit(sae="res", op="set"), InvalidArgument, "plan.edits[0].latents"),
    ],
)
def test_bad_edits_name_their_field(saes, edit, error, field):
    with pytest.raises(error) as info:
        InterventionPlan(edits=(edit,)).resolve(saes)
    assert info.value.field == field
    assert field in str(info.value)


def test_too_many_edits_is_too_large(saes):
    plan = InterventionPlan(edits=(LatentEdit(sae="res", op="ablate", latents=tuple(range(16))),))
    with pytest.raises(TooLarge) as info:
        plan.resolve(saes, max_edits=10)
    assert info.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize(
    ("scope", "field"),
    [
        (Scope(tokens="middle"), "plan.scope"),
        (Scope(step_start=-1), "plan.scope.step_start"),
        (Scope(step_start=2, step_end=2), "plan.scope.step_end"),
        (Scope(mask=torch.ones(3)), "plan.scope.mask"),
        (Scope(mask=torch.full((2, 2), 2.0)), "plan.scope.mask"),
        (Scope(mask=torch.tensor([[0.0, math.nan]])), "plan.scope.mask"),
    ],
)
def test_bad_scopes_name_their_field(saes, scope, field):
    with pytest.raises(InvalidArgument) as info:
        InterventionPlan(scope=scope).resolve(saes)
    assert info.value.field == field


def test_readout_spec_checks_sae_names_and_top_k(saes):
    ReadoutSpec(saes=("res",), top_k=5).check(saes)
    with pytest.raises(NotFound):
        ReadoutSpec(saes=("other",)).check(saes)
    with pytest.raises(InvalidArgument):
        ReadoutSpec(saes=("res",), top_k=0).check(saes)
