"""The scheduler's decisions and loop, with a fake launcher standing in for Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from scheduler_fakes import Clock, FakeLauncher, lm_spec
from sqlalchemy import Engine

from training.jobs import Job, JobState, JobStore
from training.runner import RunOutcome
from training.scheduler import Scheduler, after_failure, bundles_for, queue_order
from training.work_queue import WorkQueue
from training.workspace import JobWorkspace


@pytest.fixture
def parts(db_engine: Engine, tmp_path: Path):
    store = JobStore(db_engine, clock=Clock())
    queue = WorkQueue(db_engine)
    launcher = FakeLauncher()
    scheduler = Scheduler(store, queue, launcher, jobs_dir=tmp_path / "jobs")
    return store, queue, launcher, scheduler


def test_queue_order_is_priority_then_submit_order(parts) -> None:
    store, *_ = parts
    low = store.submit(lm_spec("a", priority=1))
    high = store.submit(lm_spec("b", priority=5))
    low_later = store.submit(lm_spec("c", priority=1))
    order = [job.name for job in queue_order(store.list())]
    assert order == ["b", "a", "c"]  # 5 before 1; the two 1s in submit order
    assert {low.id, high.id, low_later.id} == {job.id for job in store.list()}


def test_a_job_starts_when_its_reservation_is_placed_and_succeeds_from_its_outcome(parts) -> None:
    store, _, launcher, scheduler = parts
    job = store.submit(lm_spec())
    scheduler.tick()
    assert launcher.launched == [job.id.value]
    assert store.get(job.id).state == JobState.RUNNING
    launcher.outcomes[job.id.value] = RunOutcome(status="succeeded", metrics={"perplexity": 9.5})
    scheduler.tick()
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED
    assert done.metrics["perplexity"] == 9.5
    assert launcher.released == 1


def test_a_run_that_ends_in_error_leaves_one_warning_naming_the_job(
    parts, caplog: pytest.LogCaptureFixture
) -> None:
    store, _, launcher, scheduler = parts
    job = store.submit(lm_spec())
    scheduler.tick()
    launcher.outcomes[job.id.value] = RunOutcome(status="error", error="the runner was lost")
    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        scheduler.tick()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"job {job.id.value}: run ended error: the runner was lost"]


def test_the_head_of_the_queue_is_not_overtaken_by_a_smaller_job(parts) -> None:
    store, _, launcher, scheduler = parts
    first = store.submit(lm_spec("first", workers=2, hyperparameters={"batch_size": 16}))
    scheduler.tick()  # takes both workers
    big = store.submit(lm_spec("big", workers=2, priority=3, hyperparameters={"batch_size": 16}))
    small = store.submit(lm_spec("small", workers=1, priority=1))
    scheduler.tick()
    # 2 workers busy; the head (priority 3, needs 2) waits, and the small one waits behind it
    assert launcher.launched == [first.id.value]
    launcher.outcomes[first.id.value] = RunOutcome(status="succeeded")
    scheduler.tick()
    assert launcher.launched == [first.id.value, big.id.value]
    assert store.get(small.id).state == JobState.QUEUED


def test_a_cancelled_running_job_is_stopped_and_its_partial_outputs_removed(
    parts, tmp_path: Path
) -> None:
    store, queue, launcher, scheduler = parts
    job = store.submit(lm_spec())
    scheduler.tick()
    workspace = JobWorkspace(tmp_path / "jobs", job.id.value)
    (workspace.ensure() / "partial.npy").write_bytes(b"x")
    queue.put(f"{job.id.value}/tokenise", {"shard": 0}, max_attempts=3)
    store.cancel(job.id)
    scheduler.tick()
    assert launcher.stopped == [job.id.value]
    assert not workspace.path.exists()
    assert queue.counts(f"{job.id.value}/tokenise").ready == 0
    assert scheduler.running == {}


def test_a_failed_run_is_retried_while_max_retries_lasts(parts) -> None:
    store, _, launcher, scheduler = parts
    job = store.submit(lm_spec(max_retries=1))
    scheduler.tick()
    launcher.outcomes[job.id.value] = RunOutcome(status="error", error="OSError: disk")
    scheduler.tick()  # failure 1 of 1 allowed: queued again, then started again
    assert launcher.launched == [job.id.value, job.id.value]
    launcher.outcomes[job.id.value] = RunOutcome(status="error", error="OSError: disk")
    scheduler.tick()
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED
    assert failed.error == "OSError: disk"
    assert failed.metrics["failed_runs"] == 2


def test_a_filter_rejection_fails_the_job_without_a_retry(parts) -> None:
    store, _, launcher, scheduler = parts
    job = store.submit(lm_spec(max_retries=3))
    scheduler.tick()
    reason = "validation perplexity 80.00 is above the threshold 20"
    launcher.outcomes[job.id.value] = RunOutcome(status="rejected", error=reason)
    scheduler.tick()
    assert store.get(job.id).state == JobState.FAILED
    assert store.get(job.id).error == reason
    assert launcher.launched == [job.id.value]


def test_after_a_restart_running_jobs_resume_or_fail_by_their_policy(parts) -> None:
    store, queue, _, _ = parts
    resume = store.submit(lm_spec("resume"))
    fail = store.submit(lm_spec("fail", on_restart="fail"))
    for job in (resume, fail):
        store.start(job.id, stage="train")
    fresh = Scheduler(store, queue, FakeLauncher(free_workers=0), jobs_dir=Path("/nonexistent"))
    assert sorted(fresh.recover()) == sorted([resume.id.value, fail.id.value])
    assert store.get(resume.id).state == JobState.QUEUED
    assert "resumes from its last checkpoint" in store.get(resume.id).error
    assert store.get(fail.id).state == JobState.FAILED
    assert "scheduler restarted" in store.get(fail.id).error


def test_a_job_cancelled_while_queued_gives_up_its_pending_reservation(parts) -> None:
    store, _, launcher, scheduler = parts
    launcher.free_workers = 0  # nothing can be placed: the head's reservation stays pending
    job = store.submit(lm_spec())
    scheduler.tick()
    assert scheduler.pending is not None
    store.cancel(job.id)
    scheduler.tick()
    assert scheduler.pending is None
    assert launcher.released == 1


def test_after_failure_counts_runs_against_max_retries() -> None:
    job_spec = lm_spec(max_retries=2)
    job = Job(
        id=None, name="x", spec=job_spec, state=JobState.RUNNING, stage="train", priority=0,
        progress=0.5, metrics={"failed_runs": 1}, error=None, idempotency_key=None,
        created_at=0.0, updated_at=0.0, started_at=0.0, finished_at=None,
    )  # fmt: skip
    # failure 2 of max_retries 2 -> requeue; a third would fail
    assert after_failure(job, "boom").requeue
    third = Job(**{**job.__dict__, "metrics": {"failed_runs": 2}})
    assert not after_failure(third, "boom").requeue


def test_bundles_are_one_per_worker_with_its_resources() -> None:
    spec = lm_spec(workers=2, resources={"cpu": 1.5, "gpu": 1}, hyperparameters={"batch_size": 8})
    job = Job(
        id=None, name="x", spec=spec, state=JobState.QUEUED, stage=None, priority=0,
        progress=0.0, metrics={}, error=None, idempotency_key=None,
        created_at=0.0, updated_at=0.0, started_at=None, finished_at=None,
    )  # fmt: skip
    assert bundles_for(job) == [{"CPU": 1.5, "GPU": 1.0}, {"CPU": 1.5, "GPU": 1.0}]
