"""The audit log (issue 13, point 7): one JSON line per state-changing call, with time,
principal, route, target and outcome, in ``$LOOM_HOME/audit.log`` (rotated), counted in
``loom_audit_events_total``; never a key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL
from live_gateway import gateway_core
from prometheus_client import REGISTRY

from loom.cli import main as loom_main
from serving.audit import AuditLog
from serving.gateway.app import build_http_app

KEYS = {
    "ops": "ops-key-0123456789",
    "app": "app-key-0123456789",
}
SERVER = {
    "keys": [
        {"name": "ops", "key": KEYS["ops"], "scopes": ["admin"]},
        {"name": "app", "key": KEYS["app"], "scopes": ["infer", "jobs"]},
        {"name": "reader", "key": "infer-key-0123456789", "scopes": ["infer"]},
    ]
}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture
def audited(tmp_path: Path) -> tuple[TestClient, Path]:
    path = tmp_path / "audit.log"
    core = gateway_core(tmp_path, **SERVER)
    core.audit = AuditLog(path)
    return TestClient(build_http_app(core), base_url=LOOPBACK_URL), path


def test_each_line_is_json_with_time_principal_route_target_and_outcome(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    labels = {"route": "jobs.cancel", "outcome": "200"}
    before = REGISTRY.get_sample_value("loom_audit_events_total", labels) or 0.0
    log.record("ci-bot", "jobs.cancel", "job-1", "200")
    log.record("ci-bot", "jobs.submit", "job-2", "201", name="tiny-lm", promote=False)
    first, second = lines(tmp_path / "audit.log")
    assert set(first) == {"time", "principal", "route", "target", "outcome"}
    assert (first["principal"], first["route"], first["target"], first["outcome"]) == (
        "ci-bot",
        "jobs.cancel",
        "job-1",
        "200",
    )
    assert second["name"] == "tiny-lm"
    assert REGISTRY.get_sample_value("loom_audit_events_total", labels) == before + 1


def test_the_file_is_rotated(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", max_bytes=1000, backup_count=2)
    for n in range(50):  # ~100 bytes a line: 5,000 bytes over files of 1,000
        log.record("ci-bot", "jobs.submit", f"job-{n}", "201")
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.log",
        "audit.log.1",
        "audit.log.2",
    ]
    assert lines(tmp_path / "audit.log")[-1]["target"] == "job-49"


def test_jobs_submit_and_cancel_are_audited_with_their_outcome(
    audited: tuple[TestClient, Path],
) -> None:
    http, path = audited
    job = http.post("/v1/jobs", json={"name": "tiny-lm", "trainer": "lm"}, headers=bearer("app"))
    job_id = job.json()["id"]
    refused = http.post(
        "/v1/jobs", json={"name": "x", "trainer": "lm", "promote": True}, headers=bearer("app")
    )
    assert refused.status_code == 403
    http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer("app"))
    http.get("/v1/jobs", headers=bearer("app"))  # a read: not audited
    got = [(e["principal"], e["route"], e["target"], e["outcome"]) for e in lines(path)]
    assert got == [
        ("app", "jobs.submit", job_id, "201"),
        ("app", "jobs.submit", "", "403"),
        ("app", "jobs.cancel", job_id, "200"),
    ]
    assert lines(path)[0]["name"] == "tiny-lm"


def test_a_jobs_call_refused_before_its_route_runs_is_audited_too(
    audited: tuple[TestClient, Path],
) -> None:
    http, path = audited
    spec = {"name": "tiny-lm", "trainer": "lm"}
    infer_only = {"Authorization": "Bearer infer-key-0123456789"}
    http.post("/v1/jobs", json=spec)  # no key: 401
    http.post("/v1/jobs/job-1/cancel", headers={"Authorization": "Bearer wrong-0123456789"})
    http.post("/v1/jobs", content=b"{}", headers={**bearer("app"), "content-type": "text/plain"})
    http.post("/v1/jobs/job-1/cancel", headers=infer_only)  # a key without the jobs scope
    http.get("/v1/jobs")  # a refused read: not audited
    got = [(e["principal"], e["route"], e["target"], e["outcome"]) for e in lines(path)]
    assert got == [
        ("-", "jobs.submit", "", "401"),
        ("-", "jobs.cancel", "job-1", "401"),
        ("-", "jobs.submit", "", "415"),  # the browser guard runs before the key is read
        ("reader", "jobs.cancel", "job-1", "403"),
    ]


def test_promote_and_reshard_are_audited_refusals_too(audited: tuple[TestClient, Path]) -> None:
    http, path = audited
    http.post("/v1/admin/models/enc/promote", json={"version": "1"}, headers=bearer("ops"))
    http.post("/v1/admin/models/enc/promote", json={"version": "1"}, headers=bearer("app"))
    http.post("/v1/admin/shards/enc", json={"shards": 2})  # no key
    got = [(e["principal"], e["route"], e["target"]) for e in lines(path)]
    assert got == [
        ("ops", "admin_promote", "enc"),
        ("app", "admin_promote", "enc"),
        ("-", "admin_reshard", "enc"),
    ]
    outcomes = [e["outcome"] for e in lines(path)]
    assert outcomes[1:] == ["403", "401"]
    assert not any(key in path.read_text() for key in KEYS.values())


def test_loom_keys_create_and_revoke_are_audited_without_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOOM_HOME", str(tmp_path))
    assert loom_main(["keys", "create", "ci-bot", "--scopes", "infer,jobs"]) == 0
    key = capsys.readouterr().out.strip()
    assert loom_main(["keys", "list"]) == 0
    assert capsys.readouterr().out.startswith("ci-bot\tinfer,jobs\t")
    assert loom_main(["keys", "revoke", "ci-bot"]) == 0
    got = [(e["route"], e["target"], e["outcome"]) for e in lines(tmp_path / "audit.log")]
    assert got == [("keys.create", "ci-bot", "created"), ("keys.revoke", "ci-bot", "revoked")]
    assert key not in (tmp_path / "audit.log").read_text()
    assert key not in (tmp_path / "keys.json").read_text()
