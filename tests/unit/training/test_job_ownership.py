"""Jobs belong to their submitter (issue 13, point 2), over a real store (SQLite, Postgres).

The router is mounted with an ``authorize`` that names the caller from a test header, as the
gateway's names it from the key: alice and bob hold ``jobs``; maker also ``models``; root
``admin``. Another caller's job is a 404, exactly as a job that does not exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from named_callers import jobs_client
from sqlalchemy import Engine, inspect

from training.api import JobsService
from training.callers import Caller
from training.db import create_tables
from training.jobs import JobStore
from training.spec import ClusterCapacity, parse_job_spec
from training.webhook_addresses import WebhookAddressPolicy, parse_networks

LM = {"name": "tiny-lm", "trainer": "lm"}
CALLERS = {
    "alice": Caller("alice", frozenset({"jobs"})),
    "bob": Caller("bob", frozenset({"jobs"})),
    "maker": Caller("maker", frozenset({"jobs", "models"})),
    "root": Caller("root", frozenset({"admin"})),
}
SERVED = {"enc"}


def as_(name: str) -> dict[str, str]:
    return {"X-Caller": name}


@pytest.fixture
def http(db_engine: Engine, tmp_path: Path) -> Iterator[TestClient]:
    service = JobsService(
        store=JobStore(db_engine),
        capacity=lambda: ClusterCapacity(total_cpus=4, total_gpus=0),
        dataset_roots=(tmp_path,),
        events_poll_interval_s=0.02,
        webhook_policy=WebhookAddressPolicy(allowed_networks=parse_networks(["127.0.0.1/32"])),
        is_served=SERVED.__contains__,
    )

    with jobs_client(service, CALLERS) as client:
        yield client


def submit(http: TestClient, who: str, spec: dict | None = None, **headers: str):
    return http.post("/v1/jobs", json=spec or LM, headers={**as_(who), **headers})


def test_a_job_records_its_submitter_and_lists_show_only_ones_own(http: TestClient) -> None:
    alices = submit(http, "alice").json()
    bobs = submit(http, "bob").json()
    assert (alices["owner"], bobs["owner"]) == ("alice", "bob")
    listed = {
        who: [j["id"] for j in http.get("/v1/jobs", headers=as_(who)).json()["data"]]
        for who in ("alice", "bob", "root")
    }
    assert listed == {
        "alice": [alices["id"]],
        "bob": [bobs["id"]],
        "root": [alices["id"], bobs["id"]],  # admin sees every caller's
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", ""), ("GET", "/logs"), ("GET", "/events"), ("POST", "/cancel")],
)
def test_another_callers_job_is_404_as_if_it_did_not_exist(
    http: TestClient, method: str, path: str
) -> None:
    job_id = submit(http, "alice").json()["id"]
    theirs = http.request(method, f"/v1/jobs/{job_id}{path}", headers=as_("bob"))
    nobody = http.request(method, f"/v1/jobs/job-nope{path}", headers=as_("bob"))
    assert theirs.status_code == nobody.status_code == 404
    assert theirs.json()["error"]["code"] == nobody.json()["error"]["code"] == "job_not_found"
    state = http.get(f"/v1/jobs/{job_id}", headers=as_("alice")).json()["state"]
    assert state == "queued"  # bob's cancel cancelled nothing


def test_an_admin_reads_and_cancels_anyones_job(http: TestClient) -> None:
    job_id = submit(http, "alice").json()["id"]
    assert http.get(f"/v1/jobs/{job_id}", headers=as_("root")).status_code == 200
    assert http.get(f"/v1/jobs/{job_id}/logs", headers=as_("root")).status_code == 200
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel", headers=as_("root"))
    assert cancelled.json()["state"] == "cancelled"


def test_idempotency_keys_are_each_callers_own(http: TestClient) -> None:
    first = submit(http, "alice", **{"Idempotency-Key": "nightly"})
    again = submit(http, "alice", **{"Idempotency-Key": "nightly"})
    other_spec = {**LM, "name": "bobs-lm"}
    bobs = submit(http, "bob", other_spec, **{"Idempotency-Key": "nightly"})
    assert (first.status_code, again.status_code, bobs.status_code) == (201, 200, 201)
    assert again.json()["id"] == first.json()["id"]
    assert bobs.json()["id"] != first.json()["id"]  # no 409, no sight of alice's job
    assert bobs.json()["owner"] == "bob"


def test_a_job_id_another_caller_took_is_409(http: TestClient) -> None:
    assert submit(http, "alice", {**LM, "job_id": "mine"}).status_code == 201
    taken = submit(http, "bob", {**LM, "job_id": "mine"})
    assert taken.status_code == 409
    assert "alice" not in taken.text


@pytest.mark.parametrize(
    ("who", "spec", "status"),
    [
        ("alice", {**LM, "name": "enc"}, 403),  # a served name: it would replace enc
        ("alice", {**LM, "promote": True}, 403),  # moves the serving alias
        ("alice", {**LM, "name": "my-own-lm"}, 201),
        ("maker", {**LM, "name": "enc"}, 201),
        ("maker", {**LM, "promote": True}, 201),
        ("root", {**LM, "name": "enc", "promote": True}, 201),
    ],
)
def test_a_served_name_or_a_promotion_needs_the_models_scope(
    http: TestClient, who: str, spec: dict, status: int
) -> None:
    response = submit(http, who, spec)
    assert response.status_code == status, response.text
    if status == 403:
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("insufficient_scope", "models")
        assert "'models' scope" in error["message"]
        assert http.get("/v1/jobs", headers=as_("root")).json()["data"] == []


def test_the_webhook_url_is_shown_to_the_owner_only(http: TestClient) -> None:
    hook = "http://127.0.0.1:9/hook"
    job_id = submit(http, "alice", {**LM, "webhook_url": hook}).json()["id"]
    own = http.get(f"/v1/jobs/{job_id}", headers=as_("alice")).json()
    admin = http.get(f"/v1/jobs/{job_id}", headers=as_("root")).json()
    assert own["spec"]["webhook_url"] == hook
    assert admin["spec"]["webhook_url"] is None
    listed = http.get("/v1/jobs", headers=as_("root")).json()["data"]
    assert hook not in str(listed)


def test_an_older_store_gains_the_owner_column_on_open(db_engine: Engine) -> None:
    store = JobStore(db_engine)
    old = store.submit(parse_job_spec(LM))  # a job from before owners
    schema = (db_engine.get_execution_options().get("schema_translate_map") or {}).get(None)
    table = f'"{schema}".jobs' if schema else "jobs"
    with db_engine.begin() as conn:  # the store as it was then
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN owner")

    def columns() -> set[str]:
        with db_engine.connect() as conn:
            return {c["name"] for c in inspect(conn).get_columns("jobs", schema=schema)}

    assert "owner" not in columns()
    create_tables(db_engine)
    create_tables(db_engine)  # again: nothing left to add
    assert "owner" in columns()
    assert store.get(old.id).owner is None  # seen by admin keys only
    assert store.submit(parse_job_spec({**LM, "name": "new"}), owner="alice").owner == "alice"
