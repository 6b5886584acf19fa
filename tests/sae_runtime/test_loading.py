"""SAEs named by hub id resolve through huggingface_hub's cache, as base models do."""

import torch

import pytest

from sae_runtime.backends.loading import load_spec_saes, resolve_sae_location
from sae_runtime.backends.spec import ModelSpec, SaeSpec
from sae_runtime.errors import NotFound
from sae_runtime.formats import save_saelens
from sae_runtime.saes import SaeConfig, build_sae


def _hub_cache(root, repo: str, folder: str, sae) -> None:
    """Lay out a huggingface_hub cache entry for ``repo`` holding the SAE under ``folder``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    save_saelens(sae, entry / "snapshots" / commit / folder)


def test_hub_id_resolves_to_the_cached_folder_and_loads(tmp_path, monkeypatch):
    sae = build_sae(SaeConfig(architecture="jumprelu", d_in=8, d_sae=16, hook_name="blocks.1.hook_resid_post"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    _hub_cache(tmp_path, "someone/my-saes", "blocks.1.hook_resid_post", sae)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    location = resolve_sae_location("someone/my-saes/blocks.1.hook_resid_post")
    assert location.startswith(str(tmp_path)) and location.endswith("blocks.1.hook_resid_post")

    spec = ModelSpec(name="m", kind="causal_lm", path="unused", saes=(SaeSpec("r1", "someone/my-saes/blocks.1.hook_resid_post"),))
    loaded, seconds = load_spec_saes(spec)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded["r1"].encode(x), sae.encode(x))
    assert seconds["r1"] >= 0


def test_local_paths_pass_through_and_unknown_hub_ids_are_not_found(tmp_path, monkeypatch):
    assert resolve_sae_location(str(tmp_path)) == str(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(NotFound) as info:
        resolve_sae_location("nobody/nothing/layer_3")
    assert "nobody/nothing/layer_3" in str(info.value)
