"""A head of the queue that cannot be placed for ``max_placement_wait_s`` is failed with the
reason, so the jobs behind it go on; the scheduler's clock is the test's hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from scheduler_fakes import Clock, FakeLauncher, FlakyStore, HandClock, lm_spec
from sqlalchemy import Engine

from training.jobs import JobState, JobStore
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


@pytest.fixture
def parts(db_engine: Engine, tmp_path: Path) -> Parts:
    store = JobStore(db_engine, clock=Clock())
    flaky = FlakyStore(store)
    launcher = FakeLauncher(free_workers=2)
    clock = HandClock()
    scheduler = Scheduler(
        flaky,  # type: ignore[arg-type]  # a JobStore in all but name
        WorkQueue(db_engine),
        launcher,
        jobs_dir=tmp_path / "jobs",
        max_placement_wait_s=600.0,
        clock=clock,
    )
    return Parts(store, flaky, launcher, clock, scheduler)


def test_a_head_that_cannot_be_placed_in_time_fails_and_the_queue_goes_on(parts: Parts) -> None:
    # 4 workers never fit the 2 the fake cluster has; the 1-worker job behind it waits
    big = parts.store.submit(lm_spec("big", workers=4, priority=5))
    small = parts.store.submit(lm_spec("small", workers=1))
    parts.scheduler.tick()  # t = 0: the big job's reservation is asked for
    parts.clock.now_s = 599.0
    parts.scheduler.tick()  # 599 s < 600 s: still waiting, nothing overtakes it
    assert parts.store.get(big.id).state == JobState.QUEUED
    assert parts.launcher.launched == []
    parts.clock.now_s = 600.0
    parts.scheduler.tick()  # 600 s: failed, its reservation released, the small one starts
    failed = parts.store.get(big.id)
    assert failed.state == JobState.FAILED
    assert failed.error is not None
    assert "could not be placed for 600 s" in failed.error
    assert "training.max_placement_wait_s" in failed.error
    assert "4 workers x 1 CPUs" in failed.error
    assert parts.launcher.launched == [small.id.value]
    assert parts.launcher.released == 1


def test_the_wait_is_counted_from_when_the_job_became_the_head(parts: Parts) -> None:
    first = parts.store.submit(lm_spec("first", workers=2, hyperparameters={"batch_size": 16}))
    parts.scheduler.tick()  # t = 0: first runs on both workers
    parts.clock.now_s = 1000.0
    second = parts.store.submit(lm_spec("second", workers=2, hyperparameters={"batch_size": 16}))
    parts.scheduler.tick()  # t = 1000: second becomes the head and starts waiting
    parts.clock.now_s = 1599.0
    parts.launcher.outcomes[first.id.value] = RunOutcome(status="succeeded")
    parts.scheduler.tick()  # 599 s of waiting; first ended, so second is placed
    assert parts.store.get(second.id).state == JobState.RUNNING


def test_a_failing_write_that_raises_transiently_keeps_the_head_and_tries_again(
    parts: Parts,
) -> None:
    big = parts.store.submit(lm_spec("big", workers=4))
    parts.scheduler.tick()
    parts.clock.now_s = 601.0
    parts.flaky.break_next("transition")
    parts.scheduler.tick()  # the store was away: still QUEUED, reservation still held
    assert parts.store.get(big.id).state == JobState.QUEUED
    assert parts.launcher.released == 0
    parts.scheduler.tick()
    assert parts.store.get(big.id).state == JobState.FAILED
    assert parts.launcher.released == 1


def test_a_head_cancelled_while_waiting_is_not_failed(parts: Parts) -> None:
    big = parts.store.submit(lm_spec("big", workers=4))
    parts.scheduler.tick()
    parts.store.cancel(big.id)
    parts.clock.now_s = 10_000.0
    parts.scheduler.tick()
    assert parts.store.get(big.id).state == JobState.CANCELLED
