"""Fencing tokens in the job store (``training.fences``), on SQLite and Postgres: a write on
behalf of an epoch older than the highest that has written is refused and lands nothing; the
newer epoch's write is applied; the recorded epoch never goes down, even under contention."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, select

from training.db import fences, jobs
from training.fences import FenceStore
from training.jobs import JobState, JobStore
from training.leases import LeaseLost, Term
from training.spec import parse_job_spec


def term(epoch: int, holder: str = "a", name: str = "scheduler") -> Term:
    return Term(name, holder, epoch, expires_at=0.0)  # the fence reads epochs, never expiry


def stored_epoch(engine: Engine, name: str = "scheduler") -> int | None:
    with engine.connect() as conn:
        epoch = conn.execute(select(fences.c.epoch).where(fences.c.name == name)).scalar()
    return None if epoch is None else int(epoch)


def job_state(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar_one())


def test_a_write_of_an_old_epoch_is_refused_and_writes_nothing(db_engine: Engine) -> None:
    fence = FenceStore(db_engine)
    job = JobStore(db_engine).submit(parse_job_spec({"name": "tiny-lm", "trainer": "lm"}))

    def mark(by: Term, state: JobState) -> None:
        with fence.fenced(by) as conn:
            conn.execute(jobs.update().where(jobs.c.id == job.id.value).values(state=state.value))

    mark(term(1, "a"), JobState.RUNNING)
    mark(term(2, "b"), JobState.RUNNING)  # b took the lease over and wrote: the fence is at 2
    with pytest.raises(LeaseLost, match="epoch 1 of a is over"):
        mark(term(1, "a"), JobState.FAILED)  # a, back from a pause, writes for epoch 1
    assert job_state(db_engine, job.id.value) == JobState.RUNNING.value
    mark(term(2, "b"), JobState.SUCCEEDED)
    assert job_state(db_engine, job.id.value) == JobState.SUCCEEDED.value


def test_the_first_write_of_a_role_records_its_epoch(db_engine: Engine) -> None:
    assert stored_epoch(db_engine) is None
    with FenceStore(db_engine).fenced(term(3)):
        pass
    assert stored_epoch(db_engine) == 3


@pytest.mark.parametrize(
    ("epochs", "refused", "highest"),
    [
        ([5, 3], [3], 5),  # 3 < 5: refused, the fence stays at 5
        ([5, 5, 6], [], 6),  # the same epoch writes again; a newer one raises it
        ([2, 7, 4, 7, 1], [4, 1], 7),
    ],
)
def test_the_recorded_epoch_never_goes_down(
    db_engine: Engine, epochs: list[int], refused: list[int], highest: int
) -> None:
    fence = FenceStore(db_engine)
    seen_refused = []
    for i, epoch in enumerate(epochs):
        try:
            with fence.fenced(term(epoch)):
                pass
        except LeaseLost:
            seen_refused.append(epoch)
        assert stored_epoch(db_engine) == max(epochs[: i + 1])  # the highest so far
    assert seen_refused == refused
    assert stored_epoch(db_engine) == highest


def test_a_block_that_raises_leaves_the_fence_where_it_was(db_engine: Engine) -> None:
    fence = FenceStore(db_engine)
    with fence.fenced(term(1)):
        pass
    with pytest.raises(RuntimeError), fence.fenced(term(2)):
        raise RuntimeError("the write failed")  # nothing of epoch 2 landed, its mark neither
    assert stored_epoch(db_engine) == 1


def test_roles_are_fenced_apart(db_engine: Engine) -> None:
    fence = FenceStore(db_engine)
    with fence.fenced(term(9, name="scheduler")):
        pass
    with fence.fenced(term(1, name="reconciler")):  # 1 < 9, but another role's fence
        pass
    assert (stored_epoch(db_engine, "scheduler"), stored_epoch(db_engine, "reconciler")) == (9, 1)


def test_concurrent_writers_apply_in_rising_epoch_order(db_engine: Engine) -> None:
    fence = FenceStore(db_engine)
    barrier = threading.Barrier(8)
    applied: list[int] = []
    refused: list[int] = []
    errors: list[BaseException] = []

    def write(epoch: int) -> None:
        barrier.wait()
        try:
            with fence.fenced(term(epoch, holder=f"node-{epoch}")):
                applied.append(epoch)  # under the fence's lock: in commit order
        except LeaseLost:
            refused.append(epoch)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(epoch,)) for epoch in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []  # first writers raced to make the row: none failed on it
    assert applied == sorted(applied)  # each write saw every earlier one's epoch
    assert sorted(applied + refused) == list(range(1, 9))
    assert applied[-1] == 8  # the highest epoch is never refused
    assert stored_epoch(db_engine) == 8
