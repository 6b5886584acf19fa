"""The project's loaders against SAEs written by the peer libraries' own code.

tests/fixtures/peers/make_peer_fixtures.py (run in a scratch venv with sae-lens, eai-sparsify and
dictionary-learning) saved each SAE with the library's own save path and recorded the library's own
encode/decode of a fixed input. Here load_sae reads the same files and must give the same latents
and reconstructions, to 1e-4 relative to the largest value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_runtime.errors import FormatError
from sae_runtime.formats import load_sae

PEERS = Path(__file__).resolve().parents[1] / "fixtures" / "peers"
MANIFEST = json.loads((PEERS / "manifest.json").read_text())
FIXTURES = MANIFEST["fixtures"]


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = float(want.abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= 1e-4 * max(scale, 1e-6), f"{what}: max |diff| {err:.3g} vs max |value| {scale:.3g}"


def sae_dir(name: str) -> tuple[Path, Path]:
    """(directory to load, directory holding expected.safetensors)."""
    root = PEERS / name
    return (root / "layers.0" if name.startswith("sparsify/") else root), root


def test_manifest_covers_every_fixture_directory():
    on_disk = sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in PEERS.glob("*/*/expected.safetensors"))
    assert on_disk == sorted(FIXTURES)
    assert len(FIXTURES) >= 20
    assert sum(p.stat().st_size for p in PEERS.rglob("*") if p.is_file()) < 2_000_000


@pytest.mark.parametrize("name", FIXTURES)
def test_loader_matches_the_peer_library(name):
    directory, root = sae_dir(name)
    expected = load_file(str(root / "expected.safetensors"))
    x, latents, recon = expected["x"], expected["latents"], expected["recon"]
    sae = load_sae(directory)
    with torch.no_grad():
        f = sae.encode(x)
        assert_rel_close(f, latents, f"{name} latents")
        assert int((f != 0).sum()) == int((latents != 0).sum()), f"{name}: different active latents"
        assert_rel_close(sae(x), recon, f"{name} reconstruction")


def test_fixtures_have_non_unit_decoders():
    """The libraries' files keep decoder rows far from unit norm, so a loader assuming unit rows fails."""
    for name in ("dictionary_learning/april_update", "dictionary_learning/gated", "dictionary_learning/jumprelu",
                 "saelens/jumprelu", "saelens/topk_rescale_decoder_norm", "sparsify/topk_num_latents"):
        directory, _ = sae_dir(name)
        sae_file = next(p for p in directory.iterdir() if p.suffix in (".pt", ".safetensors") and p.stem != "expected")
        state = torch.load(sae_file, weights_only=True) if sae_file.suffix == ".pt" else load_file(str(sae_file))
        dec = next(state[k] for k in ("W_dec", "decoder.weight") if k in state)
        norms = dec.norm(dim=0 if dec.shape[0] < dec.shape[1] else 1)
        assert float((norms - 1).abs().max()) > 0.2, name


def test_whitened_checkpoint_without_statistics_is_refused(tmp_path):
    src, _ = sae_dir("saelens/whitened_standard")
    for item in ("cfg.json", "sae_weights.safetensors", "activation_scaler.json"):
        (tmp_path / item).write_bytes((src / item).read_bytes())
    with pytest.raises(FormatError, match="activation_whitening.safetensors") as err:
        load_sae(tmp_path)
    assert err.value.field.endswith("activation_whitening.safetensors")


def test_whitening_is_folded_not_ignored():
    """Loaded as a plain SAE (whitening dropped), the latents would differ: the fold is what matches."""
    directory, root = sae_dir("saelens/whitened_standard")
    expected = load_file(str(root / "expected.safetensors"))
    folded = load_sae(directory)
    assert folded.cfg.normalize_activations == "none"
    raw = load_file(str(directory / "sae_weights.safetensors"))
    naive = torch.relu((expected["x"] - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"])
    assert float((naive - expected["latents"]).abs().max()) > 0.1
