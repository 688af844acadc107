"""The jobs API over a real job store (SQLite and PostgreSQL), through FastAPI's TestClient.

The router is mounted on a bare app with one handler of its own for the authorize hook's
error, the way the gateway mounts it with its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from scheduler_fakes import locked
from sqlalchemy import Engine
from starlette.responses import JSONResponse

from training.api import JobsService, build_jobs_router
from training.callers import LOCAL_CALLER, Caller
from training.jobs import JobId, JobStore
from training.spec import ClusterCapacity, JobSpecInvalid, parse_job_spec, validate_job_spec

LM = {"name": "tiny-lm", "trainer": "lm"}


class Denied(Exception):
    """What the test's authorize raises: the gateway's ApiError stands here."""


@dataclass
class Api:
    client: TestClient
    store: JobStore
    wakes: list[int]
    keys: set[str]


@pytest.fixture
def api(db_engine: Engine, tmp_path: Path) -> Iterator[Api]:
    store = JobStore(db_engine)
    wakes: list[int] = []
    keys: set[str] = set()
    (tmp_path / "datasets" / "corpus").mkdir(parents=True)

    def authorize(request: Request) -> Caller:
        if keys and request.headers.get("authorization") not in {f"Bearer {k}" for k in keys}:
            raise Denied()
        return LOCAL_CALLER

    service = JobsService(
        store=store,
        capacity=lambda: ClusterCapacity(total_cpus=4, total_gpus=0),
        dataset_roots=(tmp_path / "datasets",),
        wake=lambda: wakes.append(1),
        max_body_bytes=4096,
        events_poll_interval_s=0.02,
        keep_alive_interval_s=15.0,
    )
    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=authorize))

    @app.exception_handler(Denied)
    async def denied(request: Request, exc: Denied) -> JSONResponse:
        return JSONResponse({"error": {"code": "invalid_api_key"}}, status_code=401)

    with TestClient(app) as client:
        yield Api(client, store, wakes, keys)


def error_of(response) -> dict:
    return response.json()["error"]


# --- submit ---------------------------------------------------------------------------------


def test_submit_answers_201_with_the_queued_job_and_wakes_the_scheduler(api: Api) -> None:
    response = api.client.post("/v1/jobs", json=LM)
    assert response.status_code == 201
    job = response.json()
    assert job["id"].startswith("job-")
    assert (job["name"], job["trainer"], job["state"], job["progress"]) == (
        "tiny-lm",
        "lm",
        "queued",
        0.0,
    )
    assert job["spec"]["hyperparameters"]["learning_rate"] == 3e-4  # defaults filled in
    assert isinstance(job["created_at"], float)
    assert job["started_at"] is None
    assert api.wakes == [1]


def test_a_client_chosen_job_id_names_the_job(api: Api) -> None:
    response = api.client.post("/v1/jobs", json={**LM, "job_id": "nightly-1"})
    assert response.status_code == 201
    assert response.json()["id"] == "nightly-1"
    again = api.client.post("/v1/jobs", json={**LM, "job_id": "nightly-1"})
    assert (again.status_code, again.json()["id"]) == (200, "nightly-1")
    bad = api.client.post("/v1/jobs", json={**LM, "job_id": "../etc"})
    assert bad.status_code == 422
    assert error_of(bad)["fields"][0]["field"] == "job_id"


def test_the_same_idempotency_key_and_spec_return_the_same_job_with_200(api: Api) -> None:
    headers = {"Idempotency-Key": "nightly-2026-11-27"}
    first = api.client.post("/v1/jobs", json=LM, headers=headers)
    second = api.client.post("/v1/jobs", json=LM, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]
    assert len(api.store.list()) == 1
    assert api.wakes == [1]  # a repeat queues nothing new


def test_the_same_idempotency_key_with_another_spec_is_409(api: Api) -> None:
    headers = {"Idempotency-Key": "nightly-2026-11-27"}
    api.client.post("/v1/jobs", json=LM, headers=headers)
    response = api.client.post("/v1/jobs", json={**LM, "priority": 5}, headers=headers)
    assert response.status_code == 409
    assert error_of(response)["code"] == "job_conflict"
    assert error_of(response)["type"] == "conflict_error"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "x", "trainer": "rm -rf"}, "trainer"),
        ({**LM, "hyperparameters": {"learning_rate": -0.1}}, "hyperparameters.learning_rate"),
        # 8 workers x 1 CPU = 8 CPUs > the 4 the cluster has (the batch of 16 divides by 8)
        ({**LM, "workers": 8}, "resources.cpu"),
        ({**LM, "dataset": "/etc"}, "dataset"),
    ],
)
def test_an_invalid_spec_is_422_naming_each_field(api: Api, spec: dict, field: str) -> None:
    response = api.client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    error = error_of(response)
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_job_spec",
        None,
    )
    assert [f["field"] for f in error["fields"]] == [field]
    assert error["fields"][0]["message"]
    assert api.store.list() == []
    assert api.wakes == []


def test_a_dataset_under_an_allowed_root_is_accepted(api: Api, tmp_path: Path) -> None:
    dataset = str(tmp_path / "datasets" / "corpus")
    response = api.client.post("/v1/jobs", json={**LM, "dataset": dataset})
    assert response.status_code == 201


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(api: Api, body: bytes) -> None:
    response = api.client.post("/v1/jobs", content=body)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


def test_a_body_over_the_limit_is_413(api: Api) -> None:
    big = {**LM, "padding": "x" * 5000}  # 5000 > max_body_bytes 4096
    response = api.client.post("/v1/jobs", json=big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"


# --- read, list, cancel -----------------------------------------------------------------------


def test_list_filters_by_state_and_refuses_an_unknown_state(api: Api) -> None:
    first = api.client.post("/v1/jobs", json=LM).json()["id"]
    second = api.client.post("/v1/jobs", json={**LM, "name": "other"}).json()["id"]
    api.store.start(JobId(second), stage="split")

    every = api.client.get("/v1/jobs").json()["data"]
    assert [j["id"] for j in every] == [first, second]
    queued = api.client.get("/v1/jobs", params={"state": "queued"}).json()["data"]
    assert [j["id"] for j in queued] == [first]
    running = api.client.get("/v1/jobs", params={"state": "running"}).json()["data"]
    assert [(j["id"], j["stage"]) for j in running] == [(second, "split")]
    response = api.client.get("/v1/jobs", params={"state": "paused"})
    assert (response.status_code, error_of(response)["param"]) == (400, "state")


def test_get_an_unknown_job_is_404(api: Api) -> None:
    response = api.client.get("/v1/jobs/job-nope")
    assert response.status_code == 404
    assert error_of(response)["code"] == "job_not_found"
    assert error_of(response)["type"] == "not_found_error"


def test_cancel_answers_the_cancelled_job_then_409_once_final(api: Api) -> None:
    job_id = api.client.post("/v1/jobs", json=LM).json()["id"]
    first = api.client.post(f"/v1/jobs/{job_id}/cancel")
    assert (first.status_code, first.json()["state"]) == (200, "cancelled")
    assert api.wakes == [1, 1]  # submit, cancel
    second = api.client.post(f"/v1/jobs/{job_id}/cancel")
    assert second.status_code == 409
    assert error_of(second)["code"] == "job_conflict"
    assert api.client.post("/v1/jobs/job-nope/cancel").status_code == 404


def test_logs_are_read_after_a_seq_up_to_a_limit(api: Api) -> None:
    job_id = api.client.post("/v1/jobs", json=LM).json()["id"]
    for n in range(1, 6):
        api.store.log(JobId(job_id), f"line {n}", stage="train")
    response = api.client.get(f"/v1/jobs/{job_id}/logs", params={"after": 2, "limit": 2})
    lines = response.json()["data"]
    assert [(x["seq"], x["message"], x["stage"]) for x in lines] == [
        (3, "line 3", "train"),
        (4, "line 4", "train"),
    ]
    bad = api.client.get(f"/v1/jobs/{job_id}/logs", params={"after": "x"})
    assert (bad.status_code, error_of(bad)["param"]) == (400, "after")
    assert api.client.get("/v1/jobs/job-nope/logs").status_code == 404


# --- the SSE stream -------------------------------------------------------------------------


def sse_events(text: str) -> list[dict]:
    """The data of each SSE frame (comments skipped), checking id matches the seq."""
    events = []
    for frame in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if line[:1] != ":")
        if "data" in fields:
            event = json.loads(fields["data"])
            assert fields["id"] == str(event["data"]["seq"])
            assert fields["event"] == event["type"]
            events.append(event)
    return events


def test_the_event_stream_sends_each_cloudevent_in_order_and_ends_at_a_final_state(
    api: Api,
) -> None:
    job_id = JobId(api.client.post("/v1/jobs", json=LM).json()["id"])

    def drive() -> None:  # the job moves while the stream is open
        time.sleep(0.2)
        api.store.start(job_id, stage="split")
        api.store.enter_stage(job_id, "train")
        time.sleep(0.1)
        api.store.succeed(job_id, metrics={"loss": 1.25})

    driver = threading.Thread(target=drive)
    driver.start()
    with api.client.stream("GET", f"/v1/jobs/{job_id.value}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    driver.join()
    events = sse_events(text)
    assert [e["type"] for e in events] == [
        "loom.job.queued",
        "loom.job.running",
        "loom.job.running",
        "loom.job.succeeded",
    ]
    assert [e["id"] for e in events] == [f"{job_id.value}-{n}" for n in (1, 2, 3, 4)]
    assert events[2]["data"]["stage"] == "train"


def test_the_event_stream_resumes_after_last_event_id(api: Api) -> None:
    job_id = JobId(api.client.post("/v1/jobs", json=LM).json()["id"])
    api.store.cancel(job_id)  # events 1 queued, 2 cancelled
    url = f"/v1/jobs/{job_id.value}/events"
    resumed = api.client.get(url, headers={"Last-Event-ID": "1"})
    assert [e["data"]["seq"] for e in sse_events(resumed.text)] == [2]
    after = api.client.get(url, params={"after": 2})
    assert sse_events(after.text) == []
    assert api.client.get("/v1/jobs/job-nope/events").status_code == 404


def test_an_idle_event_stream_sends_keep_alive_comments(db_engine: Engine, tmp_path: Path) -> None:
    store = JobStore(db_engine)
    service = JobsService(
        store=store,
        capacity=lambda: ClusterCapacity(total_cpus=4, total_gpus=0),
        dataset_roots=(tmp_path,),
        events_poll_interval_s=0.02,
        keep_alive_interval_s=0.05,
    )
    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=lambda request: None))
    job = store.submit(parse_job_spec(LM))
    timer = threading.Timer(0.3, store.cancel, args=(job.id,))
    timer.start()
    with TestClient(app) as client:
        text = client.get(f"/v1/jobs/{job.id.value}/events").text
    timer.join()
    assert ": keep-alive\n\n" in text
    assert [e["type"] for e in sse_events(text)] == ["loom.job.queued", "loom.job.cancelled"]


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/job-x"),
        ("POST", "/v1/jobs/job-x/cancel"),
        ("GET", "/v1/jobs/job-x/logs"),
        ("GET", "/v1/jobs/job-x/events"),
    ],
)
def test_every_route_lets_the_authorize_error_reach_the_app(
    api: Api, method: str, path: str
) -> None:
    api.keys.add("k1")
    response = api.client.request(method, path, json=LM)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"
    assert api.store.list() == []


def test_a_request_with_an_accepted_key_passes(api: Api) -> None:
    api.keys.add("k1")
    response = api.client.post("/v1/jobs", json=LM, headers={"Authorization": "Bearer k1"})
    assert response.status_code == 201


# --- hostile input: always 4xx in the error shape, never a 500 ---------------------------------


@pytest.mark.parametrize(
    "body",
    [
        # the stdlib parser raised RecursionError past ~1000 levels; the body limit is 4096
        pytest.param(b"[" * 2000 + b"]" * 2000, id="deep-array"),
        pytest.param(b'{"name": ' + b"[" * 2000 + b"]" * 2000 + b"}", id="deep-in-an-object"),
        pytest.param(b'{"name": "a", "trainer": "lm", "priority": 1e999}', id="beyond-double"),
        pytest.param(
            b'{"name": "a", "trainer": "lm", "priority": ' + b"9" * 4000 + b"}", id="4000-digits"
        ),
        pytest.param(b'{"name": "a", "trainer": "lm", "priority": NaN}', id="nan"),
        pytest.param(b'{"name": "a\\ud800", "trainer": "lm"}', id="lone-surrogate"),
        pytest.param(b'{"\\udfff": 1, "name": "a", "trainer": "lm"}', id="lone-surrogate-key"),
        pytest.param(b'{"name": "a\xff", "trainer": "lm"}', id="invalid-utf8"),
        pytest.param(b'{"name": "a\xc0\xaf", "trainer": "lm"}', id="overlong-utf8"),
        pytest.param(b'{"name": "a\xed\xa0\x80", "trainer": "lm"}', id="utf8-encoded-surrogate"),
    ],
)
def test_a_body_the_parser_refuses_is_400_in_the_error_shape(api: Api, body: bytes) -> None:
    response = api.client.post("/v1/jobs", content=body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert error["message"].startswith("malformed JSON body")
    assert api.store.list() == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**LM, "priority": 99999999999999999999999}, "priority"),  # beyond int64: 1e23
        ({**LM, "hyperparameters": {"seed": 2**64 - 1}}, "hyperparameters.seed"),
        ({**LM, "dataset": "/data/\u0000x"}, "dataset"),
        ({**LM, "dataset": "/" + "a" * 300}, "dataset"),  # a name too long for the OS
        ({**LM, "resources": {"cpu": 1e308, "gpu": 1e308}}, "resources.cpu"),
    ],
)
def test_extreme_but_well_formed_values_are_422_naming_the_field(
    api: Api, spec: dict, field: str
) -> None:
    response = api.client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert field in [f["field"] for f in error_of(response)["fields"]]
    assert api.store.list() == []


def test_a_non_finite_number_in_a_yaml_spec_is_refused_by_the_one_gate() -> None:
    raw = {**LM, "hyperparameters": {"learning_rate": float("inf")}}
    with pytest.raises(JobSpecInvalid) as caught:
        validate_job_spec(
            raw, capacity=ClusterCapacity(total_cpus=4, total_gpus=0), allowed_dataset_roots=()
        )
    assert [e.field for e in caught.value.errors] == ["hyperparameters.learning_rate"]


@pytest.mark.parametrize(
    "job_id",
    ["a%00b", "a%ED%A0%80", "a%FF", "x" * 5000, "..", "-leading-dash"],
)
def test_a_path_id_no_job_can_have_is_404_on_every_route(api: Api, job_id: str) -> None:
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/logs"),
        ("GET", f"/v1/jobs/{job_id}/events"),
    ]:
        response = api.client.request(method, path)
        if job_id == "..":  # the client resolves it to /v1/jobs, /v1/cancel, ...
            assert response.status_code in (200, 404, 405), (method, path)
            continue
        assert response.status_code == 404, (method, path)
        assert error_of(response)["code"] == "job_not_found"


def test_an_idempotency_key_with_a_control_character_is_400(api: Api) -> None:
    response = api.client.post("/v1/jobs", json=LM, headers={"Idempotency-Key": "a\x00b"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_idempotency_key"
    assert api.store.list() == []


@pytest.mark.parametrize(
    ("last_event_id", "seqs"),
    [
        (b"9" * 5000, []),  # past every event
        ("\u00b2".encode("latin-1"), [1, 2]),  # '²' is not a seq: the stream starts at the top
        (b"not-a-number", [1, 2]),
    ],
)
def test_an_odd_last_event_id_is_never_a_500(
    api: Api, last_event_id: bytes, seqs: list[int]
) -> None:
    job_id = JobId(api.client.post("/v1/jobs", json=LM).json()["id"])
    api.store.cancel(job_id)  # events 1 queued, 2 cancelled; the stream ends
    response = api.client.get(
        f"/v1/jobs/{job_id.value}/events", headers={"Last-Event-ID": last_event_id}
    )
    assert response.status_code == 200
    assert [e["data"]["seq"] for e in sse_events(response.text)] == seqs


def test_a_non_finite_metric_is_stored_as_null_and_the_job_can_be_read(api: Api) -> None:
    job_id = JobId(api.client.post("/v1/jobs", json=LM).json()["id"])
    api.store.start(job_id, stage="train")
    api.store.report_progress(job_id, progress=0.5, metrics={"loss": float("nan"), "step": 3})
    api.store.succeed(job_id, metrics={"perplexity": float("inf")})
    response = api.client.get(f"/v1/jobs/{job_id.value}")
    assert response.status_code == 200
    assert response.json()["metrics"] == {"loss": None, "step": 3, "perplexity": None}


def test_an_unreachable_store_is_503_with_retry_after(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def away(*args: object, **kwargs: object) -> None:
        raise locked()

    for method in ("get", "list", "page", "submit"):
        monkeypatch.setattr(api.store, method, away)
    with caplog.at_level(logging.WARNING, logger="training.api"):
        responses = [
            api.client.get("/v1/jobs/job-1"),
            api.client.get("/v1/jobs"),
            api.client.post("/v1/jobs", json=LM),
        ]
    for response in responses:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert error_of(response)["code"] == "store_unavailable"
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 3


def test_the_largest_after_the_api_takes_reads_nothing_on_either_database(api: Api) -> None:
    job_id = JobId(api.client.post("/v1/jobs", json=LM).json()["id"])
    api.store.log(job_id, "one line")
    after = {"after": 2**62}  # past the store's 4-byte seq: Postgres would overflow on it
    logs = api.client.get(f"/v1/jobs/{job_id.value}/logs", params=after)
    assert (logs.status_code, logs.json()["data"]) == (200, [])
    api.store.cancel(job_id)
    events = api.client.get(f"/v1/jobs/{job_id.value}/events", params=after)
    assert (events.status_code, sse_events(events.text)) == (200, [])


def test_text_with_a_nul_is_stored_on_either_database(api: Api) -> None:
    job_id = JobId(api.client.post("/v1/jobs", json=LM).json()["id"])
    api.store.log(job_id, "read 'a\x00b' from the corpus")
    api.store.fail(job_id, "OSError: bad path '/data/\x00'")
    lines = api.client.get(f"/v1/jobs/{job_id.value}/logs").json()["data"]
    assert [line["message"] for line in lines] == ["read 'a\\x00b' from the corpus"]
    assert api.client.get(f"/v1/jobs/{job_id.value}").json()["error"] == (
        "OSError: bad path '/data/\\x00'"
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            {"name": "d", "trainer": "digits", "hyperparameters": {"arch": ["mlp"] * 65}},
            "hyperparameters.arch",
        ),
        ({**LM, "hyperparameters": {"max_steps": 10**9}}, "hyperparameters.max_steps"),
    ],
)
def test_a_spec_past_a_cost_ceiling_is_422_naming_the_field(
    api: Api, spec: dict, field: str
) -> None:
    response = api.client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert [f["field"] for f in error_of(response)["fields"]] == [field]
    assert api.store.list() == []


def test_a_bad_after_is_a_400_even_beside_a_last_event_id(api: Api) -> None:
    """Found by the API fuzz: the header used to win before ``?after=`` was read at all."""
    job_id = JobId(api.client.post("/v1/jobs", json=LM).json()["id"])
    response = api.client.get(
        f"/v1/jobs/{job_id.value}/events?after=-1", headers={"Last-Event-ID": "0"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "after"
