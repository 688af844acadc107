"""The job system on PostgreSQL, as a cluster runs it: the scheduler, the runner, the queue
workers and the train workers each in their own process, all on one Postgres store (a schema
of its own for this run). Skips, saying why, when no Postgres is reachable."""

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


def test_an_lm_job_runs_end_to_end_on_a_postgres_store(postgres_jobs) -> None:
    store, queue, scheduler = postgres_jobs
    spec = {
        "name": "lm-pg",
        "trainer": "lm",
        "workers": 2,
        "stage_workers": 2,
        "hyperparameters": {
            "max_corpus_mb": 0.2, "shards": 4, "vocab_size": 400, "seq_len": 32,
            "batch_size": 8, "max_steps": 8, "checkpoint_every_steps": 4,
        },
    }  # fmt: skip
    job = store.submit(parse_job_spec(spec))
    scheduler.wake.remote()
    deadline = time.monotonic() + 180
    while store.get(job.id).state not in (JobState.SUCCEEDED, JobState.FAILED):
        assert time.monotonic() < deadline, [line.message for line in store.logs(job.id)]
        time.sleep(0.25)
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED, done.error
    # 4 shards + the validation shard, each done exactly once by the two queue workers
    items = queue.items(f"{job.id.value}/tokenise")
    assert len(items) == 5
    assert {item.state.value for item in items} == {"done"}
    assert {item.lease_owner for item in items} <= {
        f"{job.id.value}/tokenise#0",
        f"{job.id.value}/tokenise#1",
    }
    assert done.metrics["version"] == "1"
