"""Per-caller job quotas (issue 13, point 3), over a real store (SQLite, Postgres): how many
jobs one principal may have queued or running at once (429 with Retry-After past it), and
the highest priority a caller without ``admin`` may ask (422 on the field). Admin keys, and
so the keyless local mode, are bound by neither."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from named_callers import jobs_client
from sqlalchemy import Engine

from training.api import JobsService
from training.callers import LOCAL_CALLER, Caller
from training.jobs import JobQuotaExceeded, JobStore
from training.spec import ClusterCapacity, parse_job_spec

LM = {"name": "tiny-lm", "trainer": "lm"}
MAX_ACTIVE = 2
MAX_PRIORITY = 50
CALLERS = {
    "alice": Caller("alice", frozenset({"jobs"})),
    "bob": Caller("bob", frozenset({"jobs", "models"})),
    "root": Caller("root", frozenset({"admin"})),
    "local": LOCAL_CALLER,
}


@pytest.fixture
def store(db_engine: Engine) -> JobStore:
    return JobStore(db_engine)


@pytest.fixture
def http(store: JobStore, tmp_path: Path) -> Iterator[TestClient]:
    service = JobsService(
        store=store,
        capacity=lambda: ClusterCapacity(total_cpus=4, total_gpus=0),
        dataset_roots=(tmp_path,),
        max_active_jobs=MAX_ACTIVE,
        max_priority=MAX_PRIORITY,
    )

    with jobs_client(service, CALLERS) as client:
        yield client


def submit(http: TestClient, who: str, **fields: object):
    return http.post("/v1/jobs", json={**LM, **fields}, headers={"X-Caller": who})


def test_past_its_active_jobs_a_caller_gets_429_with_retry_after_and_others_go_on(
    http: TestClient,
) -> None:
    first, _ = (submit(http, "alice").json()["id"] for _ in range(MAX_ACTIVE))
    refused = submit(http, "alice")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "30"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "job_quota_exceeded")
    assert f"alice has {MAX_ACTIVE} jobs queued or running" in error["message"]
    assert submit(http, "bob").status_code == 201  # bob's own count
    # a finished (here cancelled) job no longer counts
    cancel = http.post(f"/v1/jobs/{first}/cancel", headers={"X-Caller": "alice"})
    assert cancel.status_code == 200
    assert submit(http, "alice").status_code == 201
    assert submit(http, "alice").status_code == 429


def test_a_repeat_of_a_stored_job_is_answered_at_the_quota(http: TestClient) -> None:
    key = {"X-Caller": "alice", "Idempotency-Key": "nightly-1"}
    assert http.post("/v1/jobs", json=LM, headers=key).status_code == 201
    assert submit(http, "alice").status_code == 201  # now at the quota
    repeat = http.post("/v1/jobs", json=LM, headers=key)
    assert repeat.status_code == 200  # the same job, not a new one: nothing to refuse


@pytest.mark.parametrize("who", ["root", "local"])
def test_an_admin_and_the_keyless_local_caller_are_not_bound(http: TestClient, who: str) -> None:
    statuses = [submit(http, who).status_code for _ in range(MAX_ACTIVE + 2)]
    assert statuses == [201] * (MAX_ACTIVE + 2)
    assert submit(http, who, priority=100).status_code == 201


def test_a_priority_past_the_ceiling_needs_admin(http: TestClient) -> None:
    assert submit(http, "bob", priority=MAX_PRIORITY).status_code == 201
    refused = submit(http, "bob", priority=MAX_PRIORITY + 1)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_job_spec", "priority")
    assert error["fields"] == [
        {"field": "priority", "message": f"at most {MAX_PRIORITY} without the admin scope, got 51"}
    ]
    assert submit(http, "root", priority=MAX_PRIORITY + 1).status_code == 201


def test_concurrent_submits_of_one_owner_never_pass_the_quota(store: JobStore) -> None:
    spec = parse_job_spec(LM)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def one() -> None:
        barrier.wait()
        try:
            store.submit(spec, owner="carol", max_active=3)
            outcomes.append("created")
        except JobQuotaExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    active = [j for j in store.list() if j.owner == "carol"]
    assert len(active) == 3
