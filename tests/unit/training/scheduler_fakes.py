"""Stand-ins for the scheduler's edges: a store clock, Ray (``FakeLauncher``), and a job
store whose writes fail on request (``FlakyStore``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError, OperationalError

from training.jobs import Job, JobStore
from training.runner import RunOutcome
from training.spec import parse_job_spec


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0  # every read moves on: submit order is creation order
        return self.now


class HandClock:
    """The scheduler's monotonic clock, moved only by the test."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class FakeLauncher:
    """Capacity in whole workers; a run ends when the test sets its outcome."""

    free_workers: int = 2
    reserved: dict[int, int] = field(default_factory=dict)
    outcomes: dict[str, RunOutcome] = field(default_factory=dict)
    launched: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    released: int = 0
    launch_error: Exception | None = None
    """Raised by the next ``launch`` (then cleared), after the reservation was handed over."""
    _next: int = 0

    def reserve(self, job: Job) -> Any:
        self._next += 1
        self.reserved[self._next] = job.spec.workers
        return self._next

    def is_ready(self, reservation: Any) -> bool:
        held = sum(n for r, n in self.reserved.items() if r != reservation and r < 0)
        return self.reserved[reservation] + held <= self.free_workers

    def release(self, reservation: Any) -> None:
        self.released += 1
        self.reserved.pop(reservation, None)
        self.reserved.pop(-reservation, None)

    def launch(self, job: Job, reservation: Any) -> Any:
        if self.launch_error is not None:
            error, self.launch_error = self.launch_error, None
            raise error
        # a started reservation holds its workers: keyed negative so is_ready counts it
        self.reserved[-reservation] = self.reserved.pop(reservation)
        self.launched.append(job.id.value)
        return job.id.value

    def outcome(self, run: Any) -> RunOutcome | None:
        return self.outcomes.pop(run, None)

    def stop(self, run: Any) -> None:
        self.stopped.append(run)


def lm_spec(name: str = "lm-job", **overrides: Any):
    return parse_job_spec({"name": name, "trainer": "lm", **overrides})


def locked() -> OperationalError:
    """What SQLAlchemy raises when SQLite's lock wait passes its busy timeout."""
    return OperationalError("UPDATE jobs ...", {}, sqlite3.OperationalError("database is locked"))


def refused() -> IntegrityError:
    """A write no retry can pass: the database refuses the row itself."""
    return IntegrityError(
        "UPDATE jobs ...", {}, sqlite3.IntegrityError("CHECK constraint failed: state")
    )


class FlakyStore:
    """A ``JobStore`` whose named methods raise ``locked()`` (or ``error()``) the next N times
    they are called (``break_next``; faults asked for one after another queue up, in order);
    the store's own calls between its methods are not seen.

    ``after_write=True`` makes the call write first and raise after: a commit whose answer
    was lost (the connection dropped as it committed)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._faults: dict[str, list[tuple[bool, Callable[[], Exception]]]] = {}
        self.calls: dict[str, int] = {}

    def break_next(
        self,
        method: str,
        times: int = 1,
        *,
        after_write: bool = False,
        error: Callable[[], Exception] = locked,
    ) -> None:
        self._faults.setdefault(method, []).extend([(after_write, error)] * times)

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            faults = self._faults.get(name)
            if not faults:
                return real(*args, **kwargs)
            after_write, error = faults.pop(0)
            if after_write:
                real(*args, **kwargs)
            raise error()

        wrapped: Callable[..., Any] = call
        return wrapped
