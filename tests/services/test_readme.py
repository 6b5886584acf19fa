"""The README's examples run: its Python client snippet and its CLI walk-through, against the
session's service (the demo's names swapped for the test models'), and its config example parses."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import yaml

from services.cli import main as cli_main
from services.config import parse_config
from tests.services.helpers import IMAGE, LM, LM_SAE, LM_VECTOR

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def for_tests(text: str, target: str) -> str:
    """The demo's names -> the test service's (same label vocabulary: color:red exists in both)."""
    swaps = (("localhost:9000", target), ("demo-sdxl-turbo", IMAGE), ("demo-lm", LM), ('"concepts"', f'"{LM_SAE}"'),
             ("--sae concepts", f"--sae {LM_SAE}"),
             ("--vector red=", f"--vector {LM_VECTOR}="), ("place:beach", "animal:cat"))
    for demo, test in swaps:
        text = text.replace(demo, test)
    return text


def test_the_python_snippet_runs_and_prints_a_steered_and_an_unsteered_completion(service):
    (snippet,) = [b for b in blocks("python") if "SteeringClient" in b]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(for_tests(snippet, service.target), "README.md", "exec"), {})  # noqa: S102 - our own README
    printed = out.getvalue()
    assert "| unsteered:" in printed and "| risk:" in printed, printed


def test_the_cli_walk_through_runs(service, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the image command writes its --out file here
    commands = [line.split("#")[0].strip() for b in blocks("sh") for line in b.splitlines()]
    prefix = ".venv/bin/python -m services.cli "
    calls = [shlex.split(for_tests(c[len(prefix):], service.target)) for c in commands if c.startswith(prefix)]
    assert len(calls) >= 4, commands
    for argv in calls:
        assert cli_main(["--target", service.target, *argv]) == 0, argv
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())


def test_walk_through_edits_by_label_name_their_sae_where_the_shipped_demo_has_several():
    """The test service's LM has one SAE, so the CLI finds a label's SAE by itself there; the
    shipped demo LM has several with the same labels (concepts, gsae, spade, neurons), where an
    edit by label without --sae is a usage error."""
    demo = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").read_text())
    (lm,) = [m for m in demo["models"] if m["name"] == "demo-lm"]
    assert len(lm["saes"]) > 1
    prefix = ".venv/bin/python -m services.cli generate --model demo-lm "
    commands = [line.split("#")[0].strip() for b in blocks("sh") for line in b.splitlines()]
    by_label = [c for c in commands if c.startswith(prefix)
                and re.search(r"--(set|add|scale|cap|ablate|describe|stop-when) '?[a-z]", c[len(prefix):])]
    assert by_label, commands
    for command in by_label:
        assert "--sae " in command, command


def test_the_config_example_parses():
    (example,) = [b for b in blocks("yaml") if "models:" in b]
    config = parse_config(yaml.safe_load(example))
    assert config.models[0].name == "demo-lm" and config.models[0].engine.max_running_rows == 16


def test_the_walk_through_risk_claims_hold_on_the_shipped_demo_model():
    """The README's two owl prompts, through the demo LM's backend as the CLI sends them (greedy,
    16 new tokens): the grounded question gets a low final risk, the ungrounded one is answered
    with a colour and gets the high risk the README quotes."""
    import torch

    from sae_runtime.backends.types import SamplingParams, TextRequest
    from sae_runtime.demo.eval import load_backend

    prompts = re.findall(r'generate --model demo-lm "(the owl lives in the river [^"]*)"', README)
    claimed = [float(re.search(pattern, README)[1]) for pattern in (r"at a final risk of (\d\.\d\d)", r"says so: (\d\.\d\d)")]
    assert len(prompts) == 2 and len(claimed) == 2, (prompts, claimed)
    torch.set_num_threads(1)
    backend = load_backend(Path(__file__).resolve().parents[2] / "models", batch=2)
    results = backend.generate([TextRequest(prompt=p, sampling=SamplingParams(max_new_tokens=16, seed=0)) for p in prompts])
    grounded, ungrounded = results
    assert grounded.steered.text.startswith("river")
    assert ungrounded.steered.text.split()[0] in ("red", "blue", "green", "black", "white", "yellow")
    for result, value in zip(results, claimed):
        assert abs(result.risk_final.probability - value) < 0.01, (result.risk_final.probability, value)
    assert grounded.risk_final.probability < 0.5 < ungrounded.risk_final.probability
