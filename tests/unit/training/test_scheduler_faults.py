"""The scheduler loses no job to a failed write or a failed launch, and a restarted one picks
up what the store holds: a fake launcher for Ray, a ``FlakyStore`` for the database's faults
(an ``OperationalError``, as SQLite raises past its busy timeout; an ``IntegrityError`` for a
write refused for good, which is never retried), a hand-moved clock for the retry times.
Every case runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from scheduler_fakes import Clock, FakeLauncher, FlakyStore, HandClock, lm_spec, locked, refused
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from training.db import is_transient_error
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


def errors_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


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
    assert parts.scheduler.status() == {
        "running": [], "settling": [], "pending": None, "abandoned": []
    }  # fmt: skip


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


# --- a write refused for good ----------------------------------------------------------------


def _sqlalchemy(error: type[Exception]) -> Exception:
    return error("UPDATE jobs ...", {}, Exception("driver"))


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_sqlalchemy(OperationalError), True),  # a lock wait, a server away
        (PoolTimeoutError("no connection free in the pool"), True),
        (ConnectionResetError(), True),
        (_sqlalchemy(IntegrityError), False),  # the row itself is refused
        (_sqlalchemy(ProgrammingError), False),
        (_sqlalchemy(DataError), False),
        (TypeError("Object of type set is not JSON serializable"), False),  # a bug
    ],
)
def test_only_errors_a_later_try_may_pass_count_as_transient(
    error: Exception, transient: bool
) -> None:
    assert is_transient_error(error) is transient


def test_a_dropped_connection_counts_as_transient_whatever_its_class() -> None:
    dropped = ProgrammingError("SELECT 1", {}, Exception("closed"), connection_invalidated=True)
    assert is_transient_error(dropped)


def test_an_outcome_refused_for_good_is_not_retried_and_the_job_fails_naming_it(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    job = parts.store.submit(lm_spec())
    parts.scheduler.tick()
    parts.launcher.outcomes[job.id.value] = RunOutcome(status="succeeded", metrics={"loss": 1.5})
    parts.flaky.break_next("transition", error=refused)

    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        parts.scheduler.tick()
    failed = parts.store.get(job.id)
    assert failed.state == JobState.FAILED
    assert failed.error == (
        "the scheduler could not record the end of its run (succeeded): "
        "IntegrityError: CHECK constraint failed: state"
    )
    # two writes: the refused one, then the failure; no backoff, no retry of the first
    assert parts.flaky.calls["transition"] == 2
    assert parts.scheduler.settling == {}
    assert parts.launcher.reserved == {}  # the run's reservation went back as usual
    (error,) = errors_in(caplog)  # logged once, naming the job
    assert error.startswith(f"job {job.id.value}: the store refused the end of its run")
    assert not [w for w in warnings_in(caplog) if "try" in w]  # never "try N again"
    parts.clock.now_s = 100.0
    parts.scheduler.tick()
    assert parts.flaky.calls["transition"] == 2
    assert parts.events(job) == ["queued", "running", "failed"]


def test_failing_the_job_instead_is_retried_while_its_errors_are_transient(parts: Parts) -> None:
    job = parts.store.submit(lm_spec())
    parts.scheduler.tick()
    parts.launcher.outcomes[job.id.value] = RunOutcome(status="succeeded")
    parts.flaky.break_next("transition", error=refused)
    parts.flaky.break_next("transition", error=locked)  # then the store is away a moment

    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.RUNNING
    assert list(parts.scheduler.settling) == [job.id.value]
    parts.clock.now_s = 1.0  # the first backoff (1 s)
    parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.FAILED
    assert parts.flaky.calls["transition"] == 3  # refused, locked, landed
    assert parts.scheduler.settling == {}


def test_a_job_whose_failure_is_refused_too_is_left_to_a_restarted_scheduler(
    parts: Parts, caplog: pytest.LogCaptureFixture, db_engine: Engine, tmp_path: Path
) -> None:
    job = parts.store.submit(lm_spec())  # on_restart: resume
    parts.scheduler.tick()
    parts.launcher.outcomes[job.id.value] = RunOutcome(status="succeeded")
    parts.flaky.break_next("transition", times=2, error=refused)

    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        parts.scheduler.tick()
    assert parts.store.get(job.id).state == JobState.RUNNING  # as the store has it
    assert parts.scheduler.status()["abandoned"] == [job.id.value]
    assert parts.scheduler.settling == {}
    first, second = errors_in(caplog)  # one line for each refusal, both naming the job
    assert first.startswith(f"job {job.id.value}: the store refused the end of its run")
    assert second.startswith(f"job {job.id.value}: the store refused marking it failed")
    for now_s in (10.0, 100.0, 1000.0):  # never tried again by this scheduler
        parts.clock.now_s = now_s
        parts.scheduler.tick()
    assert parts.flaky.calls["transition"] == 2
    assert parts.launcher.launched == [job.id.value]

    restarted = Scheduler(
        parts.store, WorkQueue(db_engine), FakeLauncher(), jobs_dir=tmp_path / "jobs"
    )
    restarted.tick()  # its recovery resumes the job (on_restart: resume), which runs again
    assert parts.store.get(job.id).state == JobState.RUNNING
    assert parts.events(job) == ["queued", "running", "queued", "running"]


def test_a_start_refused_for_good_fails_that_job_and_the_next_one_starts(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    refused_job = parts.store.submit(lm_spec("refused"))
    next_job = parts.store.submit(lm_spec("next"))
    parts.flaky.break_next("start", error=refused)

    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        parts.scheduler.tick()
    failed = parts.store.get(refused_job.id)
    assert failed.state == JobState.FAILED
    assert (failed.error or "").startswith("the scheduler could not record its start: ")
    assert parts.launcher.launched == [next_job.id.value]  # in the same tick
    assert parts.launcher.released == 1  # the refused job's reservation
    assert parts.scheduler.pending is None
    (error,) = errors_in(caplog)
    assert error.startswith(f"job {refused_job.id.value}: the store refused its start")
    assert parts.flaky.calls["start"] == 2  # the refused one and the next job's; no retry


def test_a_start_whose_failure_is_refused_too_is_never_picked_again(parts: Parts) -> None:
    stuck = parts.store.submit(lm_spec("stuck", priority=5))
    other = parts.store.submit(lm_spec("other"))
    parts.flaky.break_next("start", error=refused)
    parts.flaky.break_next("transition", error=refused)  # failing it from QUEUED

    parts.scheduler.tick()
    parts.scheduler.tick()
    assert parts.store.get(stuck.id).state == JobState.QUEUED  # as the store has it
    assert parts.scheduler.status()["abandoned"] == [stuck.id.value]
    # the head of the queue by priority, yet not tried again, and not blocking the queue
    assert parts.flaky.calls["start"] == 2
    assert parts.launcher.launched == [other.id.value]


def test_recovery_refused_for_good_fails_the_lost_job_once(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    lost = parts.store.submit(lm_spec("lost"))
    parts.store.start(lost.id, stage="train")
    parts.flaky.break_next("requeue", error=refused)
    with caplog.at_level(logging.INFO, logger="training.scheduler"):
        parts.scheduler.tick()
        parts.scheduler.tick()
    failed = parts.store.get(lost.id)
    assert failed.state == JobState.FAILED
    assert (failed.error or "").startswith(
        "the scheduler could not record its recovery after the restart: IntegrityError"
    )
    assert parts.flaky.calls["requeue"] == 1  # recovery is complete: not tried again
    assert len(errors_in(caplog)) == 1
    assert parts.launcher.launched == []
