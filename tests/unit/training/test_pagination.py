"""``GET /v1/jobs`` in pages: a cursor and a limit (default 100, at most 1000), walked to the
end without a job shown twice or missed, even as jobs are submitted meanwhile."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from scheduler_fakes import Clock, lm_spec
from sqlalchemy import Engine

from training.api import JobsService, build_jobs_router
from training.cli import list_all_jobs
from training.jobs import JobState, JobStore
from training.pagination import (
    BadPageQuery,
    JobCursor,
    decode_cursor,
    encode_cursor,
    page_request,
)
from training.spec import ClusterCapacity


@pytest.fixture
def store(db_engine: Engine) -> JobStore:
    return JobStore(db_engine, clock=Clock())


@pytest.fixture
def client(store: JobStore) -> Iterator[TestClient]:
    service = JobsService(
        store=store,
        capacity=lambda: ClusterCapacity(total_cpus=4, total_gpus=0),
        dataset_roots=(),
    )
    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=lambda request: None))
    with TestClient(app) as http:
        yield http


def walk(client: TestClient, query: str) -> tuple[list[str], int]:
    """Every job id, following next_cursor; and how many pages that took."""
    ids, pages, cursor = [], 0, None
    while True:
        suffix = f"&cursor={cursor}" if cursor else ""
        answer = client.get(f"/v1/jobs?{query}{suffix}").json()
        pages += 1
        ids += [job["id"] for job in answer["data"]]
        cursor = answer["next_cursor"]
        if cursor is None:
            return ids, pages


def test_walking_the_pages_shows_every_job_once_in_submit_order(
    store: JobStore, client: TestClient
) -> None:
    submitted = [store.submit(lm_spec(f"job-{i}")).id.value for i in range(7)]
    ids, pages = walk(client, "limit=3")
    assert ids == submitted
    assert pages == 3  # 3 + 3 + 1
    ids, pages = walk(client, "limit=7")
    assert (ids, pages) == (submitted, 1)  # exactly one page: no empty page after it


def test_a_job_submitted_during_the_walk_shows_on_a_later_page(
    store: JobStore, client: TestClient
) -> None:
    first = [store.submit(lm_spec(f"job-{i}")).id.value for i in range(4)]
    page = client.get("/v1/jobs?limit=2").json()
    later = store.submit(lm_spec("later")).id.value
    rest = client.get(f"/v1/jobs?limit=10&cursor={page['next_cursor']}").json()
    assert [j["id"] for j in page["data"] + rest["data"]] == [*first, later]


def test_the_state_filter_holds_across_pages(store: JobStore, client: TestClient) -> None:
    jobs = [store.submit(lm_spec(f"job-{i}")) for i in range(5)]
    store.cancel(jobs[1].id)
    store.cancel(jobs[3].id)
    ids, _ = walk(client, "state=queued&limit=1")
    assert ids == [jobs[0].id.value, jobs[2].id.value, jobs[4].id.value]


def test_the_default_page_is_100_jobs(store: JobStore, client: TestClient) -> None:
    for i in range(101):
        store.submit(lm_spec(f"job-{i}"))
    answer = client.get("/v1/jobs").json()
    assert len(answer["data"]) == 100
    assert answer["next_cursor"] is not None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=" + "A" * 500, "cursor"),
        ("state=paused", "state"),
    ],
)
def test_a_bad_limit_or_cursor_is_400_naming_it(client: TestClient, query: str, param: str) -> None:
    response = client.get(f"/v1/jobs?{query}")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_a_cursor_round_trips_and_refuses_what_it_did_not_make(store: JobStore) -> None:
    job = store.submit(lm_spec())
    assert decode_cursor(encode_cursor(job)) == JobCursor(job.created_at, job.id.value)
    for bad in ["", "e30", "WyJ4IiwxXQ", "W3RydWUsImEiXQ"]:  # "", {}, ["x",1], [true,"a"]
        with pytest.raises(BadPageQuery):
            decode_cursor(bad)
    assert page_request({}) == (None, 100)
    assert page_request({"limit": "1000"}) == (None, 1000)


def test_the_cli_follows_cursors_to_the_last_page(store: JobStore, client: TestClient) -> None:
    submitted = [store.submit(lm_spec(f"job-{i}")).id.value for i in range(5)]

    class Client:  # JobsClient's one method, over the test client
        def call(self, method: str, path: str) -> tuple[int, object]:
            response = client.request(method, path)
            return response.status_code, response.json()

    jobs = list_all_jobs(Client(), None, page_size=2)  # type: ignore[arg-type]
    assert [job["id"] for job in jobs] == submitted  # 2 + 2 + 1, three pages
    queued = list_all_jobs(Client(), JobState.QUEUED.value, page_size=2)  # type: ignore[arg-type]
    assert len(queued) == 5
