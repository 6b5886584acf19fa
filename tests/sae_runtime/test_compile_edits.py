"""compile_edits (sae_runtime/steering/compile.py) against a per-entry reference written from its
docstring's table: every op, repeated latents (layers), conditions, normalised adds, rows
without plans, several SAEs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sae_runtime.plan import Condition, EditOp, InterventionPlan, LatentEdit
from sae_runtime.saes import SaeConfig, build_sae
from sae_runtime.steering.compile import compile_edits

D_SAE = 64


@pytest.fixture(scope="module")
def saes():
    torch.manual_seed(0)
    out = {n: build_sae(SaeConfig(architecture="topk", d_in=16, d_sae=D_SAE, k=4)) for n in ("a", "b")}
    with torch.no_grad():
        for sae in out.values():
            sae.W_dec.copy_(torch.randn_like(sae.W_dec) * torch.rand(D_SAE, 1))
            sae.W_dec[5] = 0.0  # a dead latent: a normalised add on it adds nothing
    return out


def reference(plans, saes):
    """The docstring's formula table, one entry at a time: {sae: dict of (K, B, U) lists}."""
    out = {}
    for name, sae in saes.items():
        entries = [[(lat, e) for e in (p.edits if p else ()) if e.sae == name and e.op not in (EditOp.PROJECT_SET, EditOp.PROJECT_CAP)
                    for lat in e.latents] for p in plans]
        if not any(entries):
            continue
        union = sorted({lat for row in entries for lat, _ in row})
        depth = max(sum(1 for l2, _ in row if l2 == lat) for row in entries for lat, _ in row)
        conds = list(dict.fromkeys(e.condition for row in entries for _, e in row if e.condition is not None))
        table = {k: [[[d] * len(union) for _ in plans] for _ in range(depth)]
                 for k, d in (("mul", 1.0), ("add", 0.0), ("add_norm", 0.0), ("cap", math.inf), ("cond", 0))}
        for r, row in enumerate(entries):
            seen: dict[int, int] = {}
            for lat, e in row:
                k, j = seen.get(lat, 0), union.index(lat)
                seen[lat] = k + 1
                norm = float(sae.W_dec[lat].detach().double().norm())
                mul, add, add_norm, cap = {
                    EditOp.SET: (0.0, e.value, 0.0, math.inf), EditOp.ABLATE: (0.0, 0.0, 0.0, math.inf),
                    EditOp.SCALE: (e.value, 0.0, 0.0, math.inf), EditOp.CAP: (1.0, 0.0, 0.0, e.value),
                    EditOp.ADD: (1.0, 0.0, e.value / norm if norm > 0 else 0.0, math.inf) if e.normalize else (1.0, e.value, 0.0, math.inf),
                }[e.op]
                for key, v in (("mul", mul), ("add", add), ("add_norm", add_norm), ("cap", cap)):
                    table[key][k][r][j] = v
                table["cond"][k][r][j] = conds.index(e.condition) + 1 if e.condition is not None else 0
        out[name] = {"latents": union, "conditions": conds, "edits_row": [bool(row) for row in entries], **table}
    return out


def random_plans(rng: random.Random, n_rows: int) -> list:
    conds = [Condition(sae="a", latent=3, threshold=0.5), Condition(sae="a", latent=7, compare="below", threshold=1.0)]
    ops = [EditOp.SET, EditOp.ABLATE, EditOp.SCALE, EditOp.ADD, EditOp.CAP, EditOp.PROJECT_SET]
    plans = []
    for _ in range(n_rows):
        if rng.random() < 0.2:
            plans.append(None)
            continue
        edits = []
        for _ in range(rng.randint(0, 4)):
            op = rng.choice(ops)
            edits.append(LatentEdit(
                sae=rng.choice("ab"), op=op, latents=tuple(rng.sample(range(12), rng.randint(1, 4))),  # small range: repeats across edits
                value=round(rng.uniform(-3, 5), 3), normalize=op is EditOp.ADD and rng.random() < 0.5,
                condition=rng.choice([None, None, *conds])))
        plans.append(InterventionPlan(edits=tuple(edits), preserve_error=rng.random() < 0.7))
    return plans


@pytest.mark.parametrize("seed", range(25))
def test_compiled_tables_equal_the_per_entry_reference(saes, seed):
    plans = random_plans(random.Random(seed), n_rows=random.Random(seed).randint(1, 9))
    got, want = compile_edits(plans, saes), reference(plans, saes)
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.latents.tolist() == w["latents"] and g.latents.dtype == torch.long
        assert list(g.conditions) == w["conditions"]
        assert list(g.edits_row) == w["edits_row"]
        assert list(g.preserve) == [True if p is None else p.preserve_error for p in plans]
        for key in ("mul", "add", "add_norm", "cap"):
            t = getattr(g, key)
            assert t.dtype == torch.float64, key
            torch.testing.assert_close(t, torch.tensor(w[key], dtype=torch.float64), rtol=1e-12, atol=0, msg=key)
        if w["conditions"]:
            assert g.cond.dtype == torch.long and g.cond.tolist() == w["cond"]
        else:
            assert g.cond is None


def test_no_edits_compile_to_nothing(saes):
    assert compile_edits([None, InterventionPlan()], saes) == {}
