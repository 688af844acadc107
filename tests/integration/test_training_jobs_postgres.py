"""The job system on PostgreSQL, as a cluster runs it: the scheduler, the runner and the queue
workers each in their own process, all on one Postgres store (a schema of its own for this
run). Skips, saying why, when no Postgres is reachable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_schema import POSTGRES_URL, fresh_schema

from training.db import create_db_engine, create_tables
from training.jobs import JobState, JobStore
from training.runner import RunnerSettings
from training.scheduler import start_scheduler, stop_scheduler
from training.spec import parse_job_spec
from training.work_queue import WorkQueue


@pytest.fixture(scope="module")
def postgres_jobs(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[JobStore, WorkQueue, object]]:
    with fresh_schema("loom_it") as schema:
        yield from _jobs_on(schema, tmp_path_factory)


def _jobs_on(
    schema: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[JobStore, WorkQueue, object]]:
    home: Path = tmp_path_factory.mktemp("loom-training-pg")
    settings = RunnerSettings(
        db_url=POSTGRES_URL,
        db_schema=schema,
        models_dir=str(home / "models"),
        jobs_dir=str(home / "jobs"),
    )
    engine = create_db_engine(POSTGRES_URL, schema=schema)
    create_tables(engine)
    scheduler = start_scheduler(settings, tick_s=0.2)
    try:
        yield JobStore(engine), WorkQueue(engine), scheduler
    finally:
        stop_scheduler(scheduler)
        engine.dispose()


def test_a_digits_job_runs_end_to_end_on_a_postgres_store(postgres_jobs) -> None:
    store, queue, scheduler = postgres_jobs
    spec = {
        "name": "digits-pg",
        "trainer": "digits",
        "stage_workers": 2,
        "hyperparameters": {"arch": ["mlp", "mlp", "mlp"], "epochs": 3},
        "promote": True,
    }
    job = store.submit(parse_job_spec(spec))
    scheduler.wake.remote()
    deadline = time.monotonic() + 180
    while store.get(job.id).state not in (JobState.SUCCEEDED, JobState.FAILED):
        assert time.monotonic() < deadline, [line.message for line in store.logs(job.id)]
        time.sleep(0.25)
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED, done.error
    # three members, each trained exactly once by the two queue workers (SKIP LOCKED leases)
    items = queue.items(f"{job.id.value}/train_members")
    assert [item.payload["name"] for item in items] == ["mlp-1", "mlp-2", "mlp-3"]
    assert {item.state.value for item in items} == {"done"}
    assert {item.attempts for item in items} == {1}
    workers = {f"{job.id.value}/train_members#{i}" for i in range(2)}
    assert {item.lease_owner for item in items} <= workers
    assert sorted(done.metrics["versions"].values()) == ["1", "2", "3"]
