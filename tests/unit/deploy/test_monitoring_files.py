"""``deploy/monitoring``: the Grafana dashboard is importable JSON whose queries parse and name
only metrics of the monitoring contract, and the Prometheus config discovers its targets
from the gateway. ``promtool`` (Debian's ``prometheus`` package) checks both where it is
installed; without it those two tests skip."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[3] / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS = MONITORING / "prometheus.yml"
PROMTOOL = shutil.which("promtool")

CONTRACT = {
    # gateway
    "loom_requests_total", "loom_request_duration_seconds", "loom_rejected_total",
    "loom_retries_total",
    # sidecars, per replica
    "loom_queue_depth", "loom_queue_depth_seconds_total", "loom_in_flight", "loom_inputs_total",
    "loom_batch_size", "loom_max_batch_size", "loom_batch_duration_seconds",
    "loom_replica_request_duration_seconds", "loom_expired_inputs_total",
    "loom_model_load_seconds", "loom_running_sequences", "loom_waiting_sequences",
    "loom_kv_cache_use_ratio", "loom_generated_tokens_total", "loom_time_to_first_token_seconds",
    "loom_inter_token_latency_seconds", "loom_replica_cpu_seconds_total",
    "loom_replica_memory_bytes",
    # GPUs, the sidecar itself, the autoscaler
    "loom_gpu_utilization_ratio", "loom_gpu_memory_used_bytes", "loom_gpu_memory_total_bytes",
    "loom_gpu_power_watts", "loom_sidecar_cpu_seconds_total", "loom_sidecar_memory_bytes",
    "loom_sidecar_replicas", "loom_autoscaler_desired_replicas",
    "loom_autoscaler_current_replicas", "loom_autoscaler_signal",
    "loom_autoscaler_deciding_signal",
}  # fmt: skip
"""The metric names the gateway and the sidecars export (a histogram by its base name)."""
METRIC = re.compile(r"\bloom_[a-z0-9_]+")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def as_prometheus(expr: str) -> str:
    """A panel's query as Prometheus reads it once Grafana filled in its variables."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".+")


def test_the_dashboard_has_a_prometheus_datasource_variable_and_a_model_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 38
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["definition"] == "label_values(loom_requests_total, model)"
    assert model["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_has_the_panels_operators_ask_for() -> None:
    titles = " | ".join(p["title"] for p in dashboard()["panels"]).lower()
    for wanted in (
        "requests/s", "latency", "batch fill", "queue depth", "desired vs running",
        "tokens/s", "time to first token", "gpu utilisation", "gpu memory", "sidecar cpu",
        "rejected", "job states",
    ):  # fmt: skip
        assert wanted in titles


def test_the_dashboard_queries_only_metrics_of_the_contract() -> None:
    named = {name for expr in queries() for name in METRIC.findall(expr)}
    # a histogram's series are its base name with _bucket, _sum or _count
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in named}
    assert {b for b in bases if b not in CONTRACT and b + "_total" not in CONTRACT} == set()
    assert "loom_jobs" not in bases  # job states wait for that gauge: a text panel says so
    assert len(named) >= 20  # the regex found the queries' metrics, not nothing


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    # promtool parses a recording rule's expression: one rule per panel query
    rules = [{"record": f"loom:dashboard_query_{i}", "expr": as_prometheus(e)} for i, e in
             enumerate(queries())]  # fmt: skip
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(rules)} rules found" in checked.stdout


def test_prometheus_discovers_targets_from_the_gateway_and_keeps_their_job() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    assert job["scrape_interval"] == "5s"
    (discovery,) = job["http_sd_configs"]
    assert discovery["url"] == "http://127.0.0.1:8000/v1/admin/targets"
    assert discovery["refresh_interval"] == "15s"
    # the job label is the discovery answer's: only its two jobs are kept
    (keep,) = job["relabel_configs"]
    assert (keep["source_labels"], keep["action"]) == (["job"], "keep")
    assert all(re.fullmatch(keep["regex"], j) for j in ("loom-gateway", "loom-sidecar"))
    assert not re.fullmatch(keep["regex"], job["job_name"])


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_accepts_the_config_with_the_key_block_commented_and_uncommented(
    tmp_path: Path,
) -> None:
    key = tmp_path / "loom-admin-key"
    key.write_text("admin-key-0123456789\n")
    text = PROMETHEUS.read_text()
    keyed = re.sub(r"(?m)^(\s*)# (authorization:|  type: Bearer|  credentials_file:.*)$",
                   r"\1\2", text).replace("/etc/prometheus/loom-admin-key", str(key))  # fmt: skip
    assert "authorization" in yaml.safe_load(keyed)["scrape_configs"][0]["http_sd_configs"][0]
    assert PROMTOOL is not None
    for name, body in (("plain.yml", text), ("keyed.yml", keyed)):
        path = tmp_path / name
        path.write_text(body)
        checked = subprocess.run(
            [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, name + ": " + checked.stdout + checked.stderr
