"""The steering parts of a model's config entry: declared steering vectors and presets.

A preset is written exactly as a request's ``InterventionPlan`` in protobuf's JSON mapping (only
``edits`` and ``vectors``: the request gives the rest) and converted by the same code as a
request's plan (:func:`services.convert.plan_from_proto`), so a preset and a request plan cannot
drift apart. Errors name the config field (``presets.red.edits[0].op``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sae_runtime.backends.spec import VectorSpec


class VectorEntry(BaseModel):
    """A steering vector: a safetensors file holding one 1-D tensor (``tensor_key``, or its only
    one), applied at hook site ``hook_name`` (sae_runtime.vectors loads it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    hook_name: str = Field(min_length=1)
    tensor_key: str | None = Field(None, min_length=1)

    def to_spec(self, name: str, base_dir: Path) -> VectorSpec:
        return VectorSpec(name=name, path=str((base_dir / os.path.expanduser(self.path)).resolve()), hook_name=self.hook_name,
                          tensor_key=self.tensor_key)  # fmt: skip


#: The parts of a request plan a preset may hold (its edits and vectors join the request's own).
PRESET_KEYS = ("edits", "vectors")


def preset_plan(name: str, body: Any) -> Any:
    """A preset's body, written exactly as a request's InterventionPlan in protobuf's JSON mapping
    (``{edits: [{sae: concepts, op: EDIT_OP_SET, labels: [color:red], value: 60}], vectors: [...]}``),
    as a sae_runtime InterventionPlan. ValueError naming ``presets.<name>.<field>``."""
    from services.convert import plan_from_proto
    from services.http import protojson
    from services.http.errors import HttpError
    from steering.v1 import steering_pb2 as pb

    from sae_runtime.errors import SaeRuntimeError

    where = f"presets.{name}"
    if not isinstance(body, dict):
        raise ValueError(f"{where}: a preset is a mapping with {' and/or '.join(PRESET_KEYS)}, got {type(body).__name__}")
    extra = sorted(set(body) - set(PRESET_KEYS))
    if extra:
        raise ValueError(f"{where}.{extra[0]}: a preset holds only {', '.join(PRESET_KEYS)} (the request gives the rest)")
    try:
        return plan_from_proto(protojson.parse(body, pb.InterventionPlan, where=where), field=where)
    except HttpError as err:
        raise ValueError(err.message) from None
    except SaeRuntimeError as err:
        raise ValueError(str(err)) from None


def check_preset_names(plan: Any, name: str, saes: set[str], vectors: set[str]) -> None:
    """The SAEs and declared vectors a preset names exist in its model's entry."""
    for n, e in enumerate(plan.edits):
        if e.sae not in saes:
            raise ValueError(f"presets.{name}.edits[{n}].sae: unknown SAE {e.sae!r} (the model has: {', '.join(sorted(saes)) or 'none'})")
    for n, v in enumerate(plan.vectors):
        if v.vector and v.vector not in vectors:
            raise ValueError(f"presets.{name}.vectors[{n}].vector: no vector {v.vector!r} is declared under vectors "
                             f"(declared: {', '.join(sorted(vectors)) or 'none'})")
