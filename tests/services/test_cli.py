"""The command line against the live test service: what it prints is what the API returns."""

from __future__ import annotations

import json

import pytest

from services import cli
from services.client import Generation, edit
from tests.services.helpers import IMAGE, LM, LM_LABELS, LM_SAE, VLM, png_bytes


@pytest.fixture
def run(service, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")  # rich wraps tables to the terminal width

    def run(*args: str) -> tuple[int, str]:
        code = cli.main(["--target", service.target, *args])
        return code, capsys.readouterr().out

    return run


def test_generate_prints_completion_twin_latents_and_risk(run, client):
    code, out = run("generate", "--model", LM, "--set", "color:red=8", "--max-new-tokens", "5", "--seed", "2", "the cat")
    assert code == 0
    expected = client.generate(
        LM, "the cat", edits=[edit(LM_SAE, "set", "color:red", value=8.0)], generation=Generation(max_new_tokens=5),
        seed=2, include_default=True, return_latents=True,
    )
    # The clamp changed the completion, and each text sits in its own labelled row of the table.
    assert expected.completion.text != expected.default_completion.text
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert expected.completion.text.strip() in rows["steered"] and expected.default_completion.text.strip() in rows["unsteered"]
    assert expected.completion.text.strip() not in rows["unsteered"]
    assert "Top latents" in out and "color:red" in out  # the clamped latent tops the pooled readout
    assert "Hallucination risk" in out and f"{expected.risk.score:.3f}" in out


def test_generate_json_and_stream(run, client):
    code, out = run("generate", "--model", LM, "--add", "animal:cat=4", "--max-new-tokens", "4", "--json", "the dog")
    assert code == 0
    expected = client.generate(
        LM, "the dog", edits=[edit(LM_SAE, "add", "animal:cat", value=4.0)], generation=Generation(max_new_tokens=4), seed=0,
    )
    assert json.loads(out)["completion"]["text"] == expected.completion.text

    code, out = run("generate", "--model", LM, "--ablate", "3", "--max-new-tokens", "3", "--stream", "the dog")
    assert code == 0 and "risk" in out and "Generation" in out


def test_generate_with_an_image_calls_the_multimodal_rpc(run, client, tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes(5))
    code, out = run("generate", "--model", VLM, "--image", str(image), "--max-new-tokens", "3", "--json", "what is it")
    assert code == 0
    expected = client.generate_multimodal(VLM, png_bytes(5), "what is it", generation=Generation(max_new_tokens=3), seed=0)
    assert json.loads(out)["completion"]["text"] == expected.completion.text


def test_list_search_encode_health(run):
    code, out = run("list-models")
    assert code == 0 and LM in out and IMAGE in out and "causal_lm" in out and "sdxl_turbo" in out
    code, out = run("search-features", "--model", LM, "color")
    assert code == 0 and "color:red" in out and "color:blue" in out and "animal:cat" not in out
    code, out = run("encode", "--model", LM, "the red cat")
    assert code == 0 and "red" in out and "cat" in out
    code, out = run("health")
    assert code == 0 and "SERVING" in out


def test_errors_exit_with_status_and_field(run):
    code, out = run("generate", "--model", "no-such-model", "--set", "0=1", "--sae", LM_SAE, "the")
    assert code == 2 and "NOT_FOUND" in out and "model" in out
    code, out = run("generate", "--model", LM, "--set", "color:purple=1", "the")
    assert code == 2 and "color:purple" in out  # unknown label: the CLI cannot find its SAE
    code, out = run("generate", "--model", LM, "--set", f"{LM_LABELS['color:red']}=nan?", "the")
    assert code == 2 and "not a number" in out
