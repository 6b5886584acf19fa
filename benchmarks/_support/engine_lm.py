"""The demo LM (or its stand-in) as a sae_runtime ModelSpec, for the in-process engine benchmarks.

Same model as the serving benchmarks (:func:`.serving.demo_lm_setup`): ``demo-lm`` of
configs/demo.yaml when its files exist, else a random stand-in of its size written to a temp dir.
No services are imported: the spec is built here from the config entry.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from _support.serving import DEMO_CONFIG, _demo_model_entry, _standin


def demo_engine_knobs() -> dict:
    """The demo LM's ``engine:`` section of configs/demo.yaml (empty when it has none)."""
    import yaml

    entry = next(m for m in yaml.safe_load(DEMO_CONFIG.read_text())["models"] if m["name"] == "demo-lm")
    return dict(entry.get("engine") or {})


def _sae_spec(entry: dict, base: Path) -> "SaeSpec":  # noqa: F821 - imported lazily
    """A config ``saes:`` entry as a SaeSpec (an FF-KV dictionary is built from the model's layer)."""
    from sae_runtime.backends.spec import SaeSpec

    ffkv = entry.get("ffkv") or {}
    return SaeSpec(entry["name"], str(base / entry["path"]), ffkv_layer=ffkv.get("layer"), ffkv_k=ffkv.get("k"))


@contextmanager
def demo_lm_spec() -> Iterator[tuple["ModelSpec", str]]:  # noqa: F821 - imported lazily
    """(ModelSpec of the demo LM with its SAEs, risk probe, limits and engine knobs, a line saying which model)."""
    from sae_runtime.backends.spec import EngineConfig, Limits, ModelSpec, SaeSpec

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        entry = _demo_model_entry()
        if entry is not None:
            base, what = DEMO_CONFIG.parent, "demo-lm from configs/demo.yaml"
        else:
            base, what = Path(tmp), "stand-in for demo-lm (models/demo-lm not built): random Llama d128 x4 layers, SAE 1024"
            entry = _standin(base)
        spec = ModelSpec(
            name=entry["name"], kind=entry["kind"], path=str(base / entry["path"]),
            saes=tuple(_sae_spec(s, base) for s in entry.get("saes", ())),
            risk_probe=str(base / entry["risk_probe"]) if entry.get("risk_probe") else None,
            limits=Limits(**entry.get("limits", {})),
            engine=EngineConfig(**demo_engine_knobs()),
        )
        yield spec, what
