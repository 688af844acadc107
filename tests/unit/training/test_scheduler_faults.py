"""The scheduler loses no job to a failed write or a failed launch, and a restarted one picks
up what the store holds: a fake launcher for Ray, a ``FlakyStore`` for the database's faults
(an ``OperationalError``, as SQLite raises past its busy timeout), a hand-moved clock for the
retry times. Every case runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from scheduler_fakes import Clock, FakeLauncher, FlakyStore, HandClock, lm_spec
from sqlalchemy import Engine

from training.jobs import Job, JobState, JobStore
from training.runner import RunOutcome
from training.scheduler import Scheduler
from training.work_queue import WorkQueue


@dataclass
class Parts:
    store: JobStore
    flaky: FlakyStore
    launcher: FakeLauncher
    clock: HandClock
    scheduler: Scheduler

    def events(self, job: Job) -> list[str]:
        return [event.type.removeprefix("loom.job.") for event in self.store.events(job.id)]


@pytest.fixture
def parts(db_engine: Engine, tmp_path: Path) -> Parts:
    store = JobStore(db_engine, clock=Clock())
    flaky = FlakyStore(store)
    launcher = FakeLauncher()
    clock = HandClock()
    scheduler = Scheduler(
        flaky,  # type: ignore[arg-type]  # a JobStore in all but name
        WorkQueue(db_engine),
        launcher,
        jobs_dir=tmp_path / "jobs",
        write_retry_base_s=1.0,
        write_retry_cap_s=4.0,
        clock=clock,
    )
    return Parts(store, flaky, launcher, clock, scheduler)


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- a run's end whose write fails ------------------------------------------------------------


def test_an_outcome_whose_write_fails_is_kept_and_retried_with_backoff_until_it_lands(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    job = parts.store.submit(lm_spec())
    parts.scheduler.tick()
    parts.launcher.outcomes[job.id.value] = RunOutcome(status="succeeded", metrics={"loss": 1.5})
    parts.flaky.break_next("transition", times=3)

    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        parts.scheduler.tick()
    # the write failed: the job is still RUNNING in the store, and still in the books
    assert parts.store.get(job.id).state == JobState.RUNNING
    assert list(parts.scheduler.settling) == [job.id.value]
    assert parts.scheduler.running == {}
    # the run is over, so its reservation went back at once
    assert parts.launcher.reserved == {}
    assert parts.launcher.released == 1
    (warning,) = [w for w in warnings_in(caplog) if "writing the end" in w]
    assert warning.startswith(f"job {job.id.value}: writing the end of its run (succeeded)")

    # backoff 1, 2, 4 s: no try before each retry time, one at it
    tries = []
    for now_s in (0.5, 1.0, 1.5, 2.9, 3.0, 6.9, 7.0):
        parts.clock.now_s = now_s
        before = parts.flaky.calls["transition"]
        parts.scheduler.tick()
        if parts.flaky.calls["transition"] > before:
            tries.append(now_s)
    assert tries == [1.0, 3.0, 7.0]  # failures 2 and 3, then the write that lands
    done = parts.store.get(job.id)
    assert done.state == JobState.SUCCEEDED
    assert done.metrics["loss"] == 1.5
    assert parts.scheduler.settling == {}
    assert parts.events(job) == ["queued", "running", "succeeded"]
    assert parts.scheduler.status() == {"running": [], "settling": [], "pending": None}


def test_a_requeue_that_landed_but_raised_is_not_applied_twice(parts: Parts) -> None:
    job = parts.store.submit(lm_spec(max_retries=2))
    parts.scheduler.tick()
    parts.launcher.outcomes[job.id.value] = RunOutcome(status="error", error="OSError: disk")
    parts.flaky.break_next("transition", after_write=True)  # committed, but the answer was lost

    parts.scheduler.tick()
    # the store has it QUEUED; the scheduler, unsure, neither starts it nor forgets it
    assert parts.store.get(job.id).state == JobState.QUEUED
    assert list(parts.scheduler.settling) == [job.id.value]
    assert parts.launcher.launched == [job.id.value]

    parts.clock.now_s = 1.0
    parts.scheduler.tick()  # the retry is refused (no longer RUNNING): settled; then started
    assert parts.scheduler.settling == {}
    assert parts.launcher.launched == [job.id.value, job.id.value]
    requeued = parts.store.get(job.id)
    assert requeued.metrics["failed_runs"] == 1  # one failed run, counted once
    assert parts.events(job) == ["queued", "running", "queued", "running"]


def test_a_job_cancelled_while_its_end_is_unwritten_stays_cancelled(parts: Parts) -> None:
    job = parts.store.submit(lm_spec())
    parts.scheduler.tick()
    parts.launcher.outcomes[job.id.value] = RunOutcome(status="succeeded")
    parts.flaky.break_next("transition")
    parts.scheduler.tick()
    parts.store.cancel(job.id)
    parts.clock.now_s = 1.0
    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.CANCELLED
    assert parts.scheduler.settling == {}


# --- a launch that raises ---------------------------------------------------------------------


def test_a_launch_that_raises_releases_the_reservation_and_fails_the_job(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    job = parts.store.submit(lm_spec())  # max_retries 0
    parts.launcher.launch_error = RuntimeError("no node can start the runner")
    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        parts.scheduler.tick()
    failed = parts.store.get(job.id)
    assert failed.state == JobState.FAILED
    assert (
        failed.error == "could not launch the job's run: RuntimeError: no node can start the runner"
    )
    assert parts.launcher.reserved == {}  # released
    assert parts.launcher.released == 1
    assert (parts.scheduler.running, parts.scheduler.settling) == ({}, {})
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"job {job.id.value}: launching its run failed"]


def test_a_launch_that_raises_is_retried_while_max_retries_lasts(parts: Parts) -> None:
    job = parts.store.submit(lm_spec(max_retries=1))
    parts.launcher.launch_error = RuntimeError("no node can start the runner")
    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.QUEUED  # not relaunched in the same tick
    assert parts.launcher.reserved == {}
    parts.scheduler.tick()
    assert parts.launcher.launched == [job.id.value]
    assert parts.store.get(job.id).state == JobState.RUNNING
    assert parts.events(job) == ["queued", "running", "queued", "running"]


def test_a_failed_launch_whose_failure_write_also_fails_is_settled_later(parts: Parts) -> None:
    job = parts.store.submit(lm_spec())
    parts.launcher.launch_error = RuntimeError("boom")
    parts.flaky.break_next("transition")  # the failure's write (start goes its own way)
    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.RUNNING
    assert list(parts.scheduler.settling) == [job.id.value]
    assert parts.launcher.reserved == {}  # released whatever the store says
    parts.clock.now_s = 1.0
    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.FAILED
    assert parts.scheduler.settling == {}


# --- a start whose write raises ---------------------------------------------------------------


def test_a_start_that_landed_but_raised_is_launched_at_the_next_tick(parts: Parts) -> None:
    job = parts.store.submit(lm_spec())
    parts.flaky.break_next("start", after_write=True)
    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.RUNNING
    assert parts.launcher.launched == []
    assert parts.scheduler.pending is not None  # the reservation is kept, not leaked
    parts.scheduler.tick()
    assert parts.launcher.launched == [job.id.value]
    assert parts.scheduler.pending is None
    assert parts.events(job) == ["queued", "running"]  # started once


def test_a_start_that_did_not_land_is_tried_again(parts: Parts) -> None:
    job = parts.store.submit(lm_spec())
    parts.flaky.break_next("start")
    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.QUEUED
    parts.scheduler.tick()
    assert parts.launcher.launched == [job.id.value]
    assert parts.launcher.released == 0  # the same reservation, kept across the failure
    assert parts.events(job) == ["queued", "running"]


# --- a restart: what the store holds is picked up ---------------------------------------------


def test_a_new_scheduler_settles_running_jobs_and_runs_queued_ones_on_its_first_tick(
    parts: Parts,
) -> None:
    queued = parts.store.submit(lm_spec("queued"))
    resume = parts.store.submit(lm_spec("resume"))
    fail = parts.store.submit(lm_spec("fail", on_restart="fail"))
    for job in (resume, fail):  # the previous scheduler (SIGKILLed) was running these
        parts.store.start(job.id, stage="train")

    parts.scheduler.tick()  # no explicit recover(): the first tick does it

    assert parts.store.get(fail.id).state == JobState.FAILED
    assert "scheduler restarted" in (parts.store.get(fail.id).error or "")
    # 2 workers free: the queued job and the resumed one both run, in submit order
    assert parts.launcher.launched == [queued.id.value, resume.id.value]
    assert parts.events(resume) == ["queued", "running", "queued", "running"]
    assert parts.events(queued) == ["queued", "running"]
    parts.launcher.outcomes[resume.id.value] = RunOutcome(status="succeeded")
    parts.scheduler.tick()  # recovery ran once: its own running jobs are not touched again
    assert parts.store.get(resume.id).state == JobState.SUCCEEDED
    assert parts.store.get(queued.id).state == JobState.RUNNING


def test_recovery_whose_write_fails_is_finished_by_a_later_tick(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    lost = parts.store.submit(lm_spec("lost"))
    parts.store.start(lost.id, stage="train")
    parts.flaky.break_next("requeue")
    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        parts.scheduler.tick()
    assert parts.store.get(lost.id).state == JobState.RUNNING
    assert parts.launcher.launched == []
    assert any(w.startswith(f"job {lost.id.value}: could not settle") for w in warnings_in(caplog))
    parts.scheduler.tick()
    assert parts.launcher.launched == [lost.id.value]
    assert parts.events(lost) == ["queued", "running", "queued", "running"]
