"""The job store: idempotent submit, the transition table, cancel, events, listing.

Every store test runs on SQLite and on PostgreSQL (the ``db_engine`` fixture).
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from training.jobs import (
    ALLOWED_TRANSITIONS,
    JobConflict,
    JobId,
    JobNotFound,
    JobState,
    JobStore,
    can_transition,
)
from training.spec import LmJobSpec, parse_job_spec

Q, R, S, F, C = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
)


class FakeClock:
    def __init__(self, start_s: float = 1_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        self.now_s += 1.0  # every reading one second later: distinct, ordered times
        return self.now_s


@pytest.fixture
def store(db_engine: Engine) -> JobStore:
    return JobStore(db_engine, clock=FakeClock())


def lm_spec(**overrides: object) -> LmJobSpec:
    spec = parse_job_spec({"name": "tiny-lm", "trainer": "lm", **overrides})
    assert isinstance(spec, LmJobSpec)
    return spec


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (Q, R, True),
        (Q, C, True),
        (Q, F, True),  # e.g. the cluster shrank below what it needs
        (Q, S, False),  # nothing succeeds without running
        (R, R, True),  # a stage change
        (R, S, True),
        (R, F, True),
        (R, C, True),
        (R, Q, True),  # a retry
        *[(final, new, False) for final in (S, F, C) for new in JobState],
    ],
)
def test_transition_table(current: JobState, new: JobState, allowed: bool) -> None:
    assert can_transition(current, new) is allowed


def test_every_state_has_a_row_in_the_transition_table() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(JobState)


def test_submit_queues_a_job_with_its_spec(store: JobStore) -> None:
    job = store.submit(lm_spec(priority=5))
    assert (job.state, job.stage, job.priority, job.progress) == (Q, None, 5, 0.0)
    assert store.get(job.id).spec == lm_spec(priority=5)


def test_submit_with_the_same_key_and_spec_returns_the_same_job(store: JobStore) -> None:
    first = store.submit(lm_spec(), idempotency_key="nightly-1")
    again = store.submit(lm_spec(), idempotency_key="nightly-1")
    assert again.id == first.id
    assert len(store.list()) == 1


def test_submit_with_a_client_chosen_id_is_idempotent(store: JobStore) -> None:
    first = store.submit(lm_spec(), job_id="my-job")
    again = store.submit(lm_spec(), job_id="my-job")
    assert first.id == again.id == JobId("my-job")
    assert len(store.events(first.id)) == 1  # one "queued" event, not two


def test_submit_with_the_same_key_and_another_spec_conflicts(store: JobStore) -> None:
    store.submit(lm_spec(), idempotency_key="nightly-1")
    with pytest.raises(JobConflict, match="another spec"):
        store.submit(lm_spec(max_retries=2), idempotency_key="nightly-1")
    with pytest.raises(JobConflict):
        store.submit(lm_spec(max_retries=2), job_id=store.list()[0].id.value)


def test_unknown_job_is_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.get(JobId("nope"))
    with pytest.raises(JobNotFound):
        store.cancel(JobId("nope"))
    with pytest.raises(JobNotFound):
        store.events(JobId("nope"))


def test_a_job_runs_through_its_stages_to_success(store: JobStore) -> None:
    job = store.submit(lm_spec())
    started = store.start(job.id, stage="split")
    assert (started.state, started.stage) == (R, "split")
    store.enter_stage(job.id, "train")
    assert store.report_progress(job.id, progress=0.5, metrics={"loss": 2.5}) is True
    done = store.succeed(job.id, metrics={"perplexity": 12.5})
    assert (done.state, done.stage, done.progress) == (S, "train", 1.0)
    assert done.metrics == {"loss": 2.5, "perplexity": 12.5}
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.finished_at > done.started_at


def test_a_refused_transition_writes_nothing(store: JobStore) -> None:
    job = store.submit(lm_spec())
    with pytest.raises(JobConflict, match="is queued; it cannot become succeeded"):
        store.succeed(job.id)
    with pytest.raises(JobConflict):
        store.enter_stage(job.id, "train")  # a stage change needs a running job
    assert store.get(job.id).state == Q
    assert [e.type for e in store.events(job.id)] == ["loom.job.queued"]


@pytest.mark.parametrize("finish", ["succeed", "fail", "cancel"])
def test_cancel_of_a_finished_job_is_refused_as_a_conflict(store: JobStore, finish: str) -> None:
    job = store.submit(lm_spec())
    store.start(job.id, stage="train")
    if finish == "succeed":
        store.succeed(job.id)
    elif finish == "fail":
        store.fail(job.id, "boom")
    else:
        store.cancel(job.id)
    final = store.get(job.id).state
    with pytest.raises(JobConflict):
        store.cancel(job.id)
    assert store.get(job.id).state == final


def test_cancel_of_a_queued_job_succeeds(store: JobStore) -> None:
    job = store.submit(lm_spec())
    assert store.cancel(job.id).state == C


def test_progress_after_a_cancel_is_ignored(store: JobStore) -> None:
    job = store.submit(lm_spec())
    store.start(job.id, stage="train")
    store.cancel(job.id)
    assert store.report_progress(job.id, progress=0.9) is False
    assert store.get(job.id).progress == 0.0


def test_events_are_recorded_in_order_and_read_after_a_seq(store: JobStore) -> None:
    job = store.submit(lm_spec())
    store.start(job.id, stage="split")
    store.enter_stage(job.id, "train")
    store.fail(job.id, "perplexity 80 > 50")

    events = store.events(job.id)
    assert [(e.seq, e.type) for e in events] == [
        (1, "loom.job.queued"),
        (2, "loom.job.running"),
        (3, "loom.job.running"),
        (4, "loom.job.failed"),
    ]
    assert [e.data.get("stage") for e in events] == [None, "split", "train", "train"]
    assert events[3].data == {
        "state": "failed",
        "previous_state": "running",
        "stage": "train",
        "error": "perplexity 80 > 50",
    }
    assert [e.time for e in events] == sorted(e.time for e in events)
    assert [e.seq for e in store.events(job.id, after=2)] == [3, 4]


def test_each_jobs_events_are_numbered_on_their_own(store: JobStore) -> None:
    a = store.submit(lm_spec(name="a"))
    b = store.submit(lm_spec(name="b"))
    store.start(a.id, stage="split")
    store.start(b.id, stage="split")
    assert [e.seq for e in store.events(a.id)] == [1, 2]
    assert [e.seq for e in store.events(b.id)] == [1, 2]


def test_list_filters_by_state_in_submit_order(store: JobStore) -> None:
    first = store.submit(lm_spec(name="first"))
    second = store.submit(lm_spec(name="second"))
    third = store.submit(lm_spec(name="third"))
    store.start(second.id, stage="split")

    assert [j.id for j in store.list()] == [first.id, second.id, third.id]
    assert [j.id for j in store.list(Q)] == [first.id, third.id]
    assert [j.id for j in store.list(R)] == [second.id]
    assert store.list(S) == []


def test_a_requeued_job_keeps_the_reason_in_its_event_and_starts_again_clean(
    store: JobStore,
) -> None:
    job = store.submit(lm_spec())
    store.start(job.id, stage="train")
    store.requeue(job.id, "the scheduler restarted")
    assert store.get(job.id).error == "the scheduler restarted"
    store.start(job.id, stage="train")
    assert store.get(job.id).error is None
    queued = [e for e in store.events(job.id) if e.type == "loom.job.queued"]
    assert queued[-1].data["error"] == "the scheduler restarted"
