"""Leases with fencing epochs (issue 14, point 3), on SQLite and Postgres: one holder at a
time, the next epoch for each new holder, late writes of an old epoch refused, and the
elector's loop taking over when the holder dies. Lease arithmetic runs on a hand clock; the
elector's takeover waits for what the electors report, never for a time."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from contenders import FAST, Contender
from sqlalchemy import Engine, select

from training.db import jobs
from training.jobs import JobState, JobStore
from training.leases import ElectionTimings, LeaseLost, LeaseStore, Term
from training.spec import parse_job_spec


class HandClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> HandClock:
    return HandClock()


@pytest.fixture
def store(db_engine: Engine, clock: HandClock) -> LeaseStore:
    return LeaseStore(db_engine, clock=clock)


def test_the_first_contender_holds_the_lease_until_it_expires(
    store: LeaseStore, clock: HandClock
) -> None:
    first = store.acquire("scheduler", "a", duration_s=10)
    assert first == Term("scheduler", "a", 1, 1010.0)
    assert store.acquire("scheduler", "b", duration_s=10) is None
    clock.now = 1009.9
    assert store.acquire("scheduler", "b", duration_s=10) is None
    assert store.current("scheduler") == first
    clock.now = 1010.0  # expired: the next contender takes it with the next epoch
    second = store.acquire("scheduler", "b", duration_s=10)
    assert second == Term("scheduler", "b", 2, 1020.0)
    assert store.current("scheduler") == second


def test_renewing_keeps_the_epoch_and_a_lost_term_cannot_renew(
    store: LeaseStore, clock: HandClock
) -> None:
    term = store.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    clock.now = 1008.0
    renewed = store.renew(term, duration_s=10)
    assert renewed == Term("scheduler", "a", 1, 1018.0)
    assert store.acquire("scheduler", "a", duration_s=10) == Term("scheduler", "a", 1, 1018.0)
    clock.now = 1030.0  # a's pause outlived its lease; b took it over
    taken = store.acquire("scheduler", "b", duration_s=10)
    assert taken is not None
    assert taken.epoch == 2
    assert store.renew(renewed, duration_s=10) is None  # a's epoch is over
    assert not store.release(renewed)
    assert store.current("scheduler") == taken


def test_roles_are_leased_apart(store: LeaseStore) -> None:
    assert store.acquire("scheduler", "a", duration_s=10) is not None
    assert store.acquire("reconciler", "b", duration_s=10) is not None


def test_a_released_lease_is_taken_at_once_with_the_next_epoch(
    store: LeaseStore, clock: HandClock
) -> None:
    term = store.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    assert store.release(term)
    assert store.current("scheduler") is None
    taken = store.acquire("scheduler", "b", duration_s=10)
    assert taken == Term("scheduler", "b", 2, 1010.0)


def test_a_write_of_an_old_epoch_is_refused_and_changes_nothing(
    db_engine: Engine, store: LeaseStore, clock: HandClock
) -> None:
    job = JobStore(db_engine).submit(parse_job_spec({"name": "tiny-lm", "trainer": "lm"}))
    old = store.acquire("scheduler", "a", duration_s=10)
    assert old is not None

    def fail_the_job(term: Term) -> None:
        with store.fenced(term) as conn:
            conn.execute(
                jobs.update().where(jobs.c.id == job.id.value).values(state=JobState.FAILED.value)
            )

    clock.now = 1011.0
    new = store.acquire("scheduler", "b", duration_s=10)
    assert new is not None
    with pytest.raises(LeaseLost, match="epoch 1 of a is over"):
        fail_the_job(old)  # a, back from a pause, writes for the epoch it lost
    with db_engine.connect() as conn:
        state = conn.execute(select(jobs.c.state).where(jobs.c.id == job.id.value)).scalar_one()
    assert state == JobState.QUEUED.value
    fail_the_job(new)
    with db_engine.connect() as conn:
        state = conn.execute(select(jobs.c.state).where(jobs.c.id == job.id.value)).scalar_one()
    assert state == JobState.FAILED.value


def test_an_expired_term_is_refused_even_before_anyone_takes_over(
    store: LeaseStore, clock: HandClock
) -> None:
    term = store.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    clock.now = 1010.0
    with pytest.raises(LeaseLost), store.fenced(term):
        pass


def test_concurrent_contenders_elect_exactly_one(db_engine: Engine) -> None:
    store = LeaseStore(db_engine)
    barrier = threading.Barrier(8)
    won: list[Term] = []

    def contend(n: int) -> None:
        barrier.wait()
        term = store.acquire("scheduler", f"node-{n}", duration_s=60)
        if term is not None:
            won.append(term)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert store.current("scheduler") == won[0]


@pytest.mark.parametrize(
    ("duration_s", "renew_deadline_s", "retry_period_s"),
    [(10, 10, 2), (10, 12, 2), (10, 2.4, 2), (0, 0, 0), (10, 5, -1)],
)
def test_timings_that_would_let_two_holders_act_are_refused(
    duration_s: float, renew_deadline_s: float, retry_period_s: float
) -> None:
    with pytest.raises(ValueError, match="must"):
        ElectionTimings(duration_s, renew_deadline_s, retry_period_s)


@pytest.fixture
def contenders(db_engine: Engine) -> Iterator[tuple[Contender, Contender]]:
    store = LeaseStore(db_engine)
    a, b = Contender(store, "a", FAST), Contender(store, "b", FAST)
    yield a, b
    for contender in (a, b):
        contender.elector.stop()


def test_a_standby_takes_over_when_the_holder_dies(contenders: tuple[Contender, Contender]) -> None:
    a, b = contenders
    a.elector.start()
    assert a.elected.wait(30)
    b.elector.start()
    a.elector.stop(release=False)  # dies: no release, the lease must expire
    assert a.lost.is_set()
    assert b.elected.wait(30)
    assert (a.epochs, b.epochs) == ([1], [2])
    assert b.elector.term is not None
    assert b.elector.term.holder == "b"


def test_a_holder_stopping_cleanly_hands_over_at_once(
    contenders: tuple[Contender, Contender],
) -> None:
    a, b = contenders
    a.elector.start()
    assert a.elected.wait(30)
    b.elector.start()
    a.elector.stop()  # released: b need not wait out the lease
    assert b.elected.wait(30)
    assert b.epochs == [2]
    assert a.elector.transitions == 2  # elected, then stopped


def test_a_holder_whose_lease_was_taken_gives_the_role_up(
    db_engine: Engine, contenders: tuple[Contender, Contender]
) -> None:
    a, _ = contenders
    a.elector.start()
    assert a.elected.wait(30)
    # another holder whose clock sees a's lease expired (a paused past it) takes it over
    late = HandClock()
    late.now = 10**10
    taken = LeaseStore(db_engine, clock=late).acquire("reconciler", "c", duration_s=10**9)
    assert taken is not None
    assert taken.epoch == 2
    assert a.lost.wait(30)  # its next renewal failed
    assert a.elector.term is None
