"""Names users already have: Neuronpedia explanation exports as labels, SAELens release names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_runtime.backends.loading import load_spec_saes
from sae_runtime.backends.spec import ModelSpec, SaeSpec
from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.formats import neuronpedia, saelens_registry

PEER_SAE = Path(__file__).resolve().parents[1] / "fixtures" / "peers" / "saelens" / "standard"  # d_sae 32


def explanation(index, description, *, model="gpt2-small", layer="6-res-jb", **extra) -> dict:
    return {"modelId": model, "layer": layer, "index": index, "description": description,
            "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair", **extra}


def write(tmp_path: Path, records, name="export.json", lines=False) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) if lines else json.dumps(records))
    return path


def test_neuronpedia_export_keeps_the_highest_scored_explanation(tmp_path):
    path = write(tmp_path, [
        explanation("3", " mentions of cats", scores=[{"value": 0.2}]),
        explanation("3", "feline animals", scores=[{"value": 0.7}, {"value": 0.1}]),
        explanation(3, "unscored guess"),
        explanation("5", "  the   word\n'the' "),
        explanation("7", ""),  # no description: no label
    ])
    assert neuronpedia.load_labels(path, 32) == {"feline animals": 3, "the word 'the'": 5}


def test_neuronpedia_shared_descriptions_name_each_latent(tmp_path):
    path = write(tmp_path, [explanation(1, "punctuation"), explanation(4, "punctuation"), explanation(2, "dates")],
                 lines=True)
    assert neuronpedia.load_labels(path, 32) == {"punctuation [#1]": 1, "dates": 2, "punctuation [#4]": 4}


def test_neuronpedia_export_of_several_saes_needs_an_id(tmp_path):
    path = write(tmp_path, [explanation(1, "a"), explanation(2, "b", layer="7-res-jb")])
    with pytest.raises(FormatError, match="several SAEs.*gpt2-small/6-res-jb.*gpt2-small/7-res-jb"):
        neuronpedia.load_labels(path, 32)
    assert neuronpedia.load_labels(path, 32, neuronpedia_id="gpt2-small/7-res-jb") == {"b": 2}
    with pytest.raises(FormatError, match="no explanations for SAE 'gemma-2-2b/20-gemmascope-res-16k'"):
        neuronpedia.load_labels(path, 32, neuronpedia_id="gemma-2-2b/20-gemmascope-res-16k")


@pytest.mark.parametrize("index", [32, -1, "x", None, True])
def test_neuronpedia_bad_index_is_named(tmp_path, index):
    path = write(tmp_path, [explanation(index, "a")])
    with pytest.raises(FormatError, match=r"explanation 0: index .* not a latent index in \[0, 32\)") as err:
        neuronpedia.load_labels(path, 32)
    assert err.value.field == str(path)


def test_neuronpedia_not_json_is_a_format_error(tmp_path):
    path = tmp_path / "export.json"
    path.write_text("{not json")
    with pytest.raises(FormatError, match="not JSON"):
        neuronpedia.load_labels(path, 32)


def test_labels_from_an_export_reach_the_loaded_sae(tmp_path):
    """A config's ``labels:`` export becomes the SAE's labels (what SearchFeatures and edits read)."""
    path = write(tmp_path, [explanation(9, "legal documents", scores=[{"value": 0.9}]), explanation(9, "law")])
    spec = ModelSpec(name="m", kind="causal_lm", path="unused",
                     saes=(SaeSpec(name="res", path=str(PEER_SAE), labels=str(path)),))
    saes, _ = load_spec_saes(spec)
    assert saes["res"].labels == {"legal documents": 9}


def test_saelens_release_without_the_extra_names_it(monkeypatch):
    monkeypatch.setattr(saelens_registry, "available", lambda: False)
    with pytest.raises(InvalidArgument, match=r"sae-steering\[saelens\]") as err:
        saelens_registry.resolve("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
    assert err.value.field == "saes.saelens"


def test_config_saelens_entry_is_a_config_error_without_the_extra(monkeypatch):
    import importlib.util

    from services.config import ConfigError, parse_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sae_lens" else real(name, *a))
    config = {"models": [{"name": "m", "kind": "causal_lm", "path": "/tmp", "saes": [
        {"name": "s", "saelens": {"release": "gemma-scope-2b-pt-res-canonical",
                                  "sae_id": "layer_20/width_16k/canonical"}}]}]}
    with pytest.raises(ConfigError, match=r"models\.0\.saes\.0.*optional extra sae-lens.*sae-steering\[saelens\]"):
        parse_config(config, source="test")
    config["models"][0]["saes"][0]["path"] = "/tmp"
    with pytest.raises(ConfigError, match="exactly one of 'path', 'hub_id' or 'saelens'"):
        parse_config(config, source="test")
