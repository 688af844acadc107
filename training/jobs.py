"""The job store: training jobs, their states, and the events each state change leaves.

    store = JobStore(engine)
    job = store.submit(spec, idempotency_key="nightly-2026-11-27")
    store.start(job.id, stage="split")
    store.succeed(job.id, metrics={"perplexity": 12.5})

A job moves QUEUED -> RUNNING (through its stages) -> SUCCEEDED | FAILED | CANCELLED; which
moves are legal is one pure table, ``ALLOWED_TRANSITIONS``. Each move is one transaction that
locks the job's row, checks the table, writes the new state and appends one row to
``job_events``, numbered 1, 2, 3, ... within the job: the events the SSE stream and webhooks
send. Progress and metrics while running are row updates, not events.

Idempotent submit: a client-chosen ``job_id`` or ``idempotency_key`` names the job; the same
spec again returns the same job, another spec under that name raises ``JobConflict`` (409).
A job has an ``owner`` (the principal that submitted it); an idempotency key is the owner's
own (two owners may use the same key), and a ``job_id`` another owner took is a 409.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from training.db import job_events, job_logs, job_webhook_secrets, jobs, transaction
from training.spec import JobSpec, parse_job_spec

MAX_SEQ = 2**31 - 1
"""The largest event or log seq the store can hold (an INTEGER column)."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ALLOWED_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    # RUNNING -> RUNNING is a stage change; RUNNING -> QUEUED gives a failed run back for one
    # of the spec's max_retries, or after a restart that lost it
    JobState.RUNNING: frozenset(
        {
            JobState.RUNNING,
            JobState.QUEUED,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
"""Which state may follow which. The three final states lead nowhere."""

FINAL_STATES = frozenset(state for state, nexts in ALLOWED_TRANSITIONS.items() if not nexts)


def can_transition(current: JobState, new: JobState) -> bool:
    return new in ALLOWED_TRANSITIONS[current]


class JobNotFound(LookupError):
    """No job has this id (the 404 case)."""


class JobConflict(Exception):
    """The request contradicts the job as stored (the 409 case): a reused id or key with
    another spec, or a state change the transition table refuses."""


class JobQuotaExceeded(Exception):
    """The owner already has as many jobs queued or running as it may (the 429 case)."""

    def __init__(self, owner: str, active: int, limit: int) -> None:
        super().__init__(
            f"{owner} has {active} jobs queued or running, the most one caller may have at "
            f"once ({limit}); wait for one to finish, or cancel one"
        )
        self.active = active
        self.limit = limit


ACTIVE_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class JobId:
    value: str


@dataclass(frozen=True, kw_only=True)
class Job:
    """A read-only view of one job as the store holds it."""

    id: JobId
    name: str
    spec: JobSpec
    state: JobState
    stage: str | None
    """The pipeline stage while RUNNING (e.g. ``tokenise``); the last one reached after."""
    priority: int
    progress: float
    """Fraction of the job done, 0..1, as its stages report it."""
    metrics: dict[str, Any]
    error: str | None
    idempotency_key: str | None
    """As stored: ``scoped_idempotency_key`` of the owner and the client's key."""
    owner: str | None = None
    """The principal that submitted the job; None for one submitted before jobs had owners."""
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True, kw_only=True)
class LogLine:
    """One line of a job's log."""

    seq: int
    """1 for the job's first line, then 2, 3, ...: ``after=`` in reads."""
    time: float
    stage: str | None
    message: str


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One state change of a job, as ``job_events`` holds it (the body of a CloudEvent)."""

    job_id: JobId
    seq: int
    """1 for the job's first event, then 2, 3, ...: the SSE event id, and ``after=`` in reads."""
    type: str
    """``loom.job.<state>``, e.g. ``loom.job.running``."""
    time: float
    data: dict[str, Any]


class JobStore:
    """Jobs in the store's ``jobs`` and ``job_events`` tables (see the module docstring).

    ``clock`` returns seconds (``time.time`` by default); every time written comes from it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        fence: Callable[[Connection], None] | None = None,
    ) -> None:
        """``fence``, when given, runs first in every write transaction and raises to refuse
        the write: the scheduler's store checks its lease term there (``LeaseStore.check``),
        so a scheduler that lost its role changes no job's state."""
        self._engine = engine
        self._clock = clock
        self._fence = fence

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with transaction(self._engine) as conn:
            if self._fence is not None:
                self._fence(conn)
            yield conn

    def submit(
        self,
        spec: JobSpec,
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        webhook_secret: str | None = None,
        owner: str | None = None,
        max_active: int | None = None,
    ) -> Job:
        """Queue a job for ``spec`` (already validated), owned by ``owner``; the new job, or the
        one it repeats.

        With ``max_active``, a new job of an ``owner`` that already has that many queued or
        running raises ``JobQuotaExceeded`` (a repeat is returned all the same). The count
        and the insert are one transaction, serialised per owner: SQLite's write lock, a
        Postgres advisory lock on the owner.

        With ``job_id`` or ``idempotency_key``, a job of ``owner``'s already stored under either
        with the same spec is returned and nothing is written; with a different spec, or a
        ``job_id`` another owner took, ``JobConflict``. ``webhook_secret`` is stored with a new
        job (``webhook_secret``), never with a repeat.
        """
        spec_json = spec.model_dump(mode="json")
        if idempotency_key is not None and owner is not None:
            idempotency_key = scoped_idempotency_key(owner, idempotency_key)
        existing = self._find_repeat(job_id, idempotency_key, spec_json, owner)
        if existing is not None:
            return existing
        new_id = job_id if job_id is not None else f"job-{uuid.uuid4().hex}"
        now = self._clock()
        try:
            with self._writing() as conn:
                if max_active is not None and owner is not None:
                    self._check_quota(conn, owner, max_active)
                conn.execute(
                    jobs.insert().values(
                        id=new_id,
                        idempotency_key=idempotency_key,
                        owner=owner,
                        name=spec.name,
                        trainer=spec.trainer,
                        spec=spec_json,
                        state=JobState.QUEUED.value,
                        priority=spec.priority,
                        progress=0.0,
                        metrics={},
                        last_event_seq=0,
                        webhook_url=str(spec.webhook_url) if spec.webhook_url else None,
                        webhook_seq=0,
                        last_log_seq=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                if webhook_secret is not None:
                    conn.execute(
                        job_webhook_secrets.insert().values(job_id=new_id, secret=webhook_secret)
                    )
                self._append_event(conn, new_id, JobState.QUEUED, now, {"state": "queued"})
        except IntegrityError:
            # a concurrent submit took the id or key between our look and our insert
            existing = self._find_repeat(job_id, idempotency_key, spec_json, owner)
            if existing is None:
                raise
            return existing
        return self.get(JobId(new_id))

    @staticmethod
    def _check_quota(conn: Connection, owner: str, max_active: int) -> None:
        if conn.dialect.name == "postgresql":  # two submits of one owner count one by one
            conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(owner))))
        active = conn.execute(
            select(func.count())
            .select_from(jobs)
            .where(jobs.c.owner == owner, jobs.c.state.in_(ACTIVE_STATES))
        ).scalar_one()
        if active >= max_active:
            raise JobQuotaExceeded(owner, active, max_active)

    def _find_repeat(
        self, job_id: str | None, key: str | None, spec_json: dict[str, Any], owner: str | None
    ) -> Job | None:
        for column, value in ((jobs.c.id, job_id), (jobs.c.idempotency_key, key)):
            if value is None:
                continue
            with transaction(self._engine, write=False) as conn:
                row = conn.execute(select(jobs).where(column == value)).one_or_none()
            if row is None:
                continue
            if owner is not None and row.owner != owner:  # (a scoped key is never another's)
                raise JobConflict(f"{column.name} {value!r} is taken; choose another")
            if row.spec != spec_json:
                raise JobConflict(f"{column.name} {value!r} already names a job with another spec")
            return _job_from_row(row)
        return None

    def get(self, job_id: JobId) -> Job:
        with transaction(self._engine, write=False) as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id.value)).one_or_none()
        if row is None:
            raise JobNotFound(job_id.value)
        return _job_from_row(row)

    def list(
        self, state: JobState | None = None, *, owner: str | None = None
    ) -> builtins.list[Job]:
        """Jobs in submit order, only those in ``state`` and of ``owner`` if given."""
        query = select(jobs).order_by(jobs.c.created_at, jobs.c.id)
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with transaction(self._engine, write=False) as conn:
            rows = conn.execute(query).all()
        return [_job_from_row(row) for row in rows]

    def page(
        self,
        state: JobState | None = None,
        *,
        owner: str | None = None,
        after: tuple[float, str] | None = None,
        limit: int,
    ) -> builtins.list[Job]:
        """At most ``limit`` jobs in submit order after ``after`` (a job's ``(created_at,
        id)``: keyset pagination, ``training.pagination``), only those in ``state`` and of
        ``owner`` if given."""
        query = select(jobs).order_by(jobs.c.created_at, jobs.c.id).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        if after is not None:
            created_at, job_id = after
            query = query.where(
                or_(
                    jobs.c.created_at > created_at,
                    and_(jobs.c.created_at == created_at, jobs.c.id > job_id),
                )
            )
        with transaction(self._engine, write=False) as conn:
            rows = conn.execute(query).all()
        return [_job_from_row(row) for row in rows]

    def drop_history_before(self, finished_before: float) -> builtins.list[str]:
        """Delete the events and log lines of jobs that finished before ``finished_before``
        (epoch seconds; the retention sweep): the ids of the jobs that had any. The job rows
        stay, so ``GET /v1/jobs/{id}`` still shows how each ended."""
        final = [state.value for state in FINAL_STATES]
        old = select(jobs.c.id).where(jobs.c.state.in_(final), jobs.c.finished_at < finished_before)
        with self._writing() as conn:
            with_events = select(job_events.c.job_id).where(job_events.c.job_id.in_(old))
            with_logs = select(job_logs.c.job_id).where(job_logs.c.job_id.in_(old))
            ids = {row[0] for row in conn.execute(with_events.union(with_logs)).all()}
            if ids:
                conn.execute(job_events.delete().where(job_events.c.job_id.in_(ids)))
                conn.execute(job_logs.delete().where(job_logs.c.job_id.in_(ids)))
        return sorted(ids)

    # --- state changes: each one transaction, each one event ----------------------------------

    def start(self, job_id: JobId, *, stage: str) -> Job:
        """QUEUED -> RUNNING, in ``stage``."""
        return self.transition(job_id, JobState.RUNNING, stage=stage)

    def enter_stage(self, job_id: JobId, stage: str) -> Job:
        """RUNNING -> RUNNING, now in ``stage``."""
        return self.transition(job_id, JobState.RUNNING, stage=stage, require=JobState.RUNNING)

    def succeed(self, job_id: JobId, *, metrics: Mapping[str, Any] | None = None) -> Job:
        return self.transition(job_id, JobState.SUCCEEDED, metrics=metrics)

    def fail(self, job_id: JobId, error: str) -> Job:
        return self.transition(job_id, JobState.FAILED, error=error)

    def requeue(self, job_id: JobId, reason: str) -> Job:
        """RUNNING -> QUEUED: the run was lost or failed and will be tried again."""
        return self.transition(job_id, JobState.QUEUED, error=reason)

    def cancel(self, job_id: JobId) -> Job:
        """Cancel a queued or running job; ``JobConflict`` if it has already finished."""
        return self.transition(job_id, JobState.CANCELLED)

    def transition(
        self,
        job_id: JobId,
        new: JobState,
        *,
        stage: str | None = None,
        error: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        require: JobState | None = None,
    ) -> Job:
        """Move the job to ``new`` if the table allows it from its current state.

        ``require`` also demands that current state. ``JobNotFound``, or ``JobConflict`` with
        nothing written when refused. ``metrics`` merge into the job's; ``error`` replaces.
        """
        now = self._clock()
        error = storable_text(error) if error is not None else None
        metrics = storable_json(dict(metrics)) if metrics else None
        with self._writing() as conn:
            # FOR UPDATE: a concurrent change of this job waits, then sees our state
            row = conn.execute(
                select(jobs).where(jobs.c.id == job_id.value).with_for_update()
            ).one_or_none()
            if row is None:
                raise JobNotFound(job_id.value)
            current = JobState(row.state)
            if (require is not None and current != require) or not can_transition(current, new):
                raise JobConflict(f"job {job_id.value} is {current}; it cannot become {new}")
            values: dict[str, Any] = {"state": new.value, "updated_at": now}
            if stage is not None:
                values["stage"] = stage
            if error is not None:
                values["error"] = error
            elif current == JobState.QUEUED and new == JobState.RUNNING:
                values["error"] = None  # a retry starts clean; the reason stays in its event
            if metrics:
                values["metrics"] = {**row.metrics, **metrics}
            if new == JobState.RUNNING and row.started_at is None:
                values["started_at"] = now
            if new in FINAL_STATES:
                values["finished_at"] = now
                if new == JobState.SUCCEEDED:
                    values["progress"] = 1.0
            conn.execute(update(jobs).where(jobs.c.id == job_id.value).values(**values))
            data = {
                "state": new.value,
                "previous_state": current.value,
                "stage": values.get("stage", row.stage),
            }
            if error is not None:
                data["error"] = error
            self._append_event(conn, job_id.value, new, now, data)
            updated = conn.execute(select(jobs).where(jobs.c.id == job_id.value)).one()
        return _job_from_row(updated)

    def report_progress(
        self,
        job_id: JobId,
        *,
        progress: float,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record a running job's progress (0..1) and merge ``metrics``; no event.

        False, and nothing written, when the job is not RUNNING (a late report after a cancel).
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress is a fraction 0..1, got {progress}")
        metrics = storable_json(dict(metrics)) if metrics else None
        now = self._clock()
        with self._writing() as conn:
            row = conn.execute(
                select(jobs.c.metrics)
                .where(jobs.c.id == job_id.value, jobs.c.state == JobState.RUNNING.value)
                .with_for_update()
            ).one_or_none()
            if row is None:
                return False
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id.value)
                .values(
                    progress=progress, metrics={**row.metrics, **(metrics or {})}, updated_at=now
                )
            )
        return True

    def events(self, job_id: JobId, *, after: int = 0) -> builtins.list[JobEvent]:
        """The job's events with ``seq > after``, in order; ``JobNotFound`` for an unknown job."""
        rows = self._rows_after(job_events, job_id, after)
        return [
            JobEvent(job_id=job_id, seq=row.seq, type=row.type, time=row.time, data=row.data)
            for row in rows
        ]

    def _rows_after(
        self, table: Table, job_id: JobId, after: int, *, limit: int | None = None
    ) -> builtins.list[Row[Any]]:
        """A job's rows of ``table`` (events or log lines) with ``seq > after``, in order."""
        # seq is a 4-byte integer, and Postgres casts the bound value to its type: a larger
        # ``after`` (a client's) would overflow there, where it can only mean "past them all"
        after = min(after, MAX_SEQ)
        with transaction(self._engine, write=False) as conn:
            if conn.execute(select(jobs.c.id).where(jobs.c.id == job_id.value)).first() is None:
                raise JobNotFound(job_id.value)
            query = (
                select(table)
                .where(table.c.job_id == job_id.value, table.c.seq > after)
                .order_by(table.c.seq)
            )
            return list(conn.execute(query if limit is None else query.limit(limit)).all())

    # --- the job's log ----------------------------------------------------------------------

    def log(self, job_id: JobId, message: str, *, stage: str | None = None) -> int:
        """Append one line to the job's log; its seq. ``JobNotFound`` for an unknown job."""
        message = storable_text(message)
        now = self._clock()
        with self._writing() as conn:
            seq = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id.value)
                .values(last_log_seq=jobs.c.last_log_seq + 1)
                .returning(jobs.c.last_log_seq)
            ).scalar_one_or_none()
            if seq is None:
                raise JobNotFound(job_id.value)
            conn.execute(
                job_logs.insert().values(
                    job_id=job_id.value, seq=seq, time=now, stage=stage, message=message
                )
            )
        return seq

    def logs(self, job_id: JobId, *, after: int = 0, limit: int = 1000) -> builtins.list[LogLine]:
        """Up to ``limit`` log lines with ``seq > after``, in order; ``JobNotFound`` if unknown."""
        rows = self._rows_after(job_logs, job_id, after, limit=limit)
        return [
            LogLine(seq=row.seq, time=row.time, stage=row.stage, message=row.message)
            for row in rows
        ]

    # --- webhook delivery: the deliverer's cursor per job ----------------------------------

    def webhook_backlog(
        self, limit: int = 100, *, after: tuple[float, str] | None = None
    ) -> builtins.list[tuple[Job, JobEvent]]:
        """For each job with a webhook and undelivered events, its next event to deliver.

        Oldest event first, ordered by (event time, job id); ``after`` is the last pair of a
        previous page, so a reader pages through the whole backlog, ``limit`` at a time."""
        query = (
            select(jobs, job_events)
            .join(
                job_events,
                (job_events.c.job_id == jobs.c.id) & (job_events.c.seq == jobs.c.webhook_seq + 1),
            )
            .where(jobs.c.webhook_url.is_not(None))
            .order_by(job_events.c.time, jobs.c.id)
            .limit(limit)
        )
        if after is not None:
            after_time, after_id = after
            query = query.where(
                or_(
                    job_events.c.time > after_time,
                    and_(job_events.c.time == after_time, jobs.c.id > after_id),
                )
            )
        with transaction(self._engine, write=False) as conn:
            rows = conn.execute(query).all()
        backlog = []
        for row in rows:
            job = _job_from_row(row)
            event = JobEvent(
                job_id=job.id, seq=row.seq, type=row.type, time=row.time, data=row.data
            )
            backlog.append((job, event))
        return backlog

    def webhook_secret(self, job_id: JobId) -> str | None:
        """The secret the job's deliveries are signed with; None for a job stored without one."""
        with transaction(self._engine, write=False) as conn:
            return conn.execute(
                select(job_webhook_secrets.c.secret).where(
                    job_webhook_secrets.c.job_id == job_id.value
                )
            ).scalar_one_or_none()

    def webhook_done(self, job_id: JobId, seq: int) -> bool:
        """Move the job's webhook cursor past event ``seq`` (delivered, or given up on).

        Only from ``seq - 1``: a second deliverer that raced us changes nothing (False)."""
        with self._writing() as conn:
            moved = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id.value, jobs.c.webhook_seq == seq - 1)
                .values(webhook_seq=seq)
            ).rowcount
        return moved == 1

    @staticmethod
    def _append_event(
        conn: Connection, job_id: str, state: JobState, now: float, data: dict[str, Any]
    ) -> None:
        # the job's row is ours in this transaction, so its counter numbers events without gaps
        seq = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(last_event_seq=jobs.c.last_event_seq + 1)
            .returning(jobs.c.last_event_seq)
        ).scalar_one()
        conn.execute(
            job_events.insert().values(
                job_id=job_id, seq=seq, type=f"loom.job.{state.value}", time=now, data=data
            )
        )


def storable_text(text: str) -> str:
    """``text`` as both databases store it: a NUL (Postgres refuses it in text) written
    ``\\x00``. An error or log line may quote anything (a corpus line, a path)."""
    return text.replace("\x00", "\\x00")


def storable_json(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no NaN (Postgres refuses
    ``NaN`` in a json column, and the API could not answer it), and a diverged loss is one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: storable_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable_json(item) for item in value]
    if isinstance(value, str):
        return storable_text(value)
    return value


def scoped_idempotency_key(owner: str, key: str) -> str:
    """What the store keeps for ``owner``'s ``Idempotency-Key``: sha256 of both, 64 hex digits
    (fits the column however long the two are; two owners' equal keys differ)."""
    return hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()


def _job_from_row(row: Row[Any]) -> Job:
    return Job(
        id=JobId(row.id),
        name=row.name,
        spec=parse_job_spec(row.spec),
        state=JobState(row.state),
        stage=row.stage,
        priority=row.priority,
        progress=row.progress,
        metrics=dict(row.metrics),
        error=row.error,
        idempotency_key=row.idempotency_key,
        owner=row.owner,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
