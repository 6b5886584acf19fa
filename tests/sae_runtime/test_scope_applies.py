"""A scope field that a model kind does not read is refused, naming the field; seeds span uint64."""

from __future__ import annotations

import pytest
import torch

from sae_runtime.errors import InvalidArgument
from sae_runtime.plan import CfgHalf, Scope, TokenScope, VisionScope, check_scope_applies, check_seed

CASES = [
    ("causal_lm", Scope(vision=VisionScope.CLS), "plan.scope.vision"),
    ("causal_lm", Scope(mask=torch.ones(2, 2)), "plan.scope.mask"),
    ("causal_lm", Scope(step_start=1), "plan.scope.step_start"),
    ("causal_lm", Scope(cfg_half=CfgHalf.COND), "plan.scope.cfg_half"),
    ("llava", Scope(mask=torch.ones(2, 2)), "plan.scope.mask"),
    ("llava", Scope(step_end=2), "plan.scope.step_end"),
    ("sdxl_turbo", Scope(tokens=TokenScope.PROMPT), "plan.scope.tokens"),
    ("sdxl_turbo", Scope(vision=VisionScope.CLS), "plan.scope.vision"),
]


@pytest.mark.parametrize(("kind", "scope", "field"), CASES)
def test_a_scope_that_does_not_apply_is_invalid(kind, scope, field):
    with pytest.raises(InvalidArgument, match=f"does not apply to a {kind} model") as err:
        check_scope_applies(scope, kind)
    assert err.value.field == field


@pytest.mark.parametrize(("kind", "scope"), [
    ("causal_lm", Scope(tokens=TokenScope.GENERATED)),
    ("llava", Scope(tokens=TokenScope.PROMPT, vision=VisionScope.CLS)),
    ("sdxl_turbo", Scope(mask=torch.ones(2, 2), step_start=1, step_end=2, cfg_half=CfgHalf.COND)),
    ("causal_lm", Scope()),
])
def test_scopes_that_apply_pass(kind, scope):
    check_scope_applies(scope, kind)


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_seed_accepts_the_whole_uint64_range(seed):
    check_seed(seed, "seed")


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_seed_outside_uint64_is_invalid(seed):
    with pytest.raises(InvalidArgument, match=r"\[0, 2\*\*64\)"):
        check_seed(seed, "seed")
