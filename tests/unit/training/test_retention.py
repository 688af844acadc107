"""The retention sweep: a finished job's events, log lines and workspace are removed once it
finished ``retention_days`` ago; the job's row stays. Both clocks are the test's hand."""

from __future__ import annotations

from pathlib import Path

from scheduler_fakes import FakeLauncher, HandClock, lm_spec
from sqlalchemy import Engine

from training.jobs import JobState, JobStore
from training.scheduler import Scheduler
from training.work_queue import WorkQueue
from training.workspace import JobWorkspace

DAY_S = 86_400.0


class WallClock:
    """Epoch seconds, moved by the test (the store's clock and the sweep's cut-off)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_finished_jobs_history_is_swept_after_the_retention_period(
    db_engine: Engine, tmp_path: Path
) -> None:
    wall, tick_clock = WallClock(), HandClock()
    store = JobStore(db_engine, clock=wall)
    scheduler = Scheduler(
        store,
        WorkQueue(db_engine),
        FakeLauncher(free_workers=2),
        jobs_dir=tmp_path / "jobs",
        retention_days=7,
        retention_sweep_interval_s=600,
        clock=tick_clock,
        wall_clock=wall,
    )
    old = store.submit(lm_spec("old"))
    store.log(old.id, "a line")
    store.fail(old.id, "broke")  # finished at t0
    finished_at = wall.now
    wall.now += 3 * DAY_S
    recent = store.submit(lm_spec("recent"))
    store.fail(recent.id, "broke")  # finished at t0 + 3 days
    queued = store.submit(lm_spec("queued"))  # runs, never finishes: never swept
    for job in (old, recent, queued):
        workspace = JobWorkspace(tmp_path / "jobs", job.id.value).path
        workspace.mkdir(parents=True)
        (workspace / "checkpoint.pt").write_bytes(b"x")
    scheduler.tick()  # the first tick sweeps: nothing is 7 days old yet
    assert store.events(old.id) != []

    # t0 + 7 days + 1 s: the old job's history is past the retention; the sweep waits for
    # its interval (600 s on the scheduler's clock) first
    wall.now = finished_at + 7 * DAY_S + 1
    tick_clock.now_s = 599.0
    scheduler.tick()
    assert store.events(old.id) != []
    tick_clock.now_s = 600.0
    scheduler.tick()
    assert store.events(old.id) == []
    assert store.logs(old.id) == []
    assert not JobWorkspace(tmp_path / "jobs", old.id.value).path.exists()
    assert store.get(old.id).state == JobState.FAILED  # the row stays
    # 4 days after the recent one finished, and a running job: both kept
    assert store.events(recent.id) != []
    assert JobWorkspace(tmp_path / "jobs", recent.id.value).path.exists()
    assert JobWorkspace(tmp_path / "jobs", queued.id.value).path.exists()
    assert scheduler.sweep_retention() == []  # swept once: nothing left to sweep
