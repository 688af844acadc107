"""Leases with fencing epochs: ownership election in the job store (Burns ch. 10).

A lease names a role (``"scheduler"``, ``"reconciler"``). One holder at a time holds it until
its expiry, renewing it while it works; a contender takes it once it has expired. Every new
holder gets the next **epoch**, a fencing token: a write made on behalf of a role runs in
``fenced(term)``, which checks in the same transaction that the term's epoch is still the
lease's and unexpired, so a holder that lost the lease (paused, partitioned, slow) and
writes late is refused (``LeaseLost``), never applied.

    leases = LeaseStore(engine)
    term = leases.acquire("scheduler", "node-a:4242", duration_s=15)   # a Term, or None
    term = leases.renew(term, duration_s=15)                            # None: lost
    with leases.fenced(term) as conn:                                   # LeaseLost if stale
        conn.execute(update(jobs)...)
    leases.release(term)                                                # the next takes over

``Elector`` runs that loop in a thread: acquire, renew every ``retry_period_s``, give the
role up (``on_lost``) when no renewal succeeded within ``renew_deadline_s``, release on stop.

Times are the callers' clocks (``time.time``), as everywhere in the store: holders on
different machines must keep their clocks within a small part of ``duration_s`` (NTP).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, Row, select, update
from sqlalchemy.exc import IntegrityError

from training.db import is_transient_error, leases, transaction

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """A write on behalf of a term that is no longer the lease's (another epoch, or expired)."""


@dataclass(frozen=True)
class Term:
    """One holder's hold on a lease: valid while the lease still has this epoch."""

    name: str
    holder: str
    epoch: int
    expires_at: float


class LeaseBackend(Protocol):
    """Where leases live: the job store (``LeaseStore``) or Kubernetes ``Lease`` objects
    (``training.k8s_leases``). ``Elector`` contends through this and nothing else."""

    def acquire(self, name: str, holder: str, *, duration_s: float) -> Term | None: ...

    def renew(self, term: Term, *, duration_s: float) -> Term | None: ...

    def release(self, term: Term) -> bool: ...

    def current(self, name: str) -> Term | None: ...


class LeaseStore:
    """The leases of one job store (SQLite or Postgres)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def acquire(self, name: str, holder: str, *, duration_s: float) -> Term | None:
        """The lease for ``holder``: a new term (the next epoch) when it was free or expired,
        the same epoch renewed when ``holder`` holds it already; None while another holds it."""
        now = self._clock()
        try:
            with transaction(self._engine) as conn:
                row = _locked(conn, name)
                if row is None:
                    conn.execute(
                        leases.insert().values(
                            name=name,
                            holder=holder,
                            epoch=1,
                            acquired_at=now,
                            renewed_at=now,
                            expires_at=now + duration_s,
                        )
                    )
                    return Term(name, holder, 1, now + duration_s)
                if row.expires_at > now and row.holder != holder:
                    return None
                epoch = row.epoch if row.expires_at > now else row.epoch + 1
                values = {"holder": holder, "epoch": epoch, "renewed_at": now}
                if epoch != row.epoch:
                    values["acquired_at"] = now
                conn.execute(
                    update(leases)
                    .where(leases.c.name == name)
                    .values(**values, expires_at=now + duration_s)
                )
                return Term(name, holder, epoch, now + duration_s)
        except IntegrityError:  # another contender inserted the first row between our looks
            return None

    def renew(self, term: Term, *, duration_s: float) -> Term | None:
        """``term`` extended by ``duration_s`` from now; None when it is no longer the lease's
        (expired, or another holder's epoch)."""
        now = self._clock()
        if not self._update_while_held(term, now, renewed_at=now, expires_at=now + duration_s):
            return None
        return Term(term.name, term.holder, term.epoch, now + duration_s)

    def release(self, term: Term) -> bool:
        """Give the lease up now, so a contender need not wait for it to expire; False when
        ``term`` had lost it already."""
        now = self._clock()
        return self._update_while_held(term, now, expires_at=now)

    def _update_while_held(self, term: Term, now: float, **values: float) -> bool:
        """One conditional write of ``values``, "where ``term`` still holds the lease"."""
        with transaction(self._engine) as conn:
            done = conn.execute(
                update(leases)
                .where(
                    leases.c.name == term.name,
                    leases.c.holder == term.holder,
                    leases.c.epoch == term.epoch,
                    leases.c.expires_at > now,
                )
                .values(**values)
            )
        return done.rowcount == 1

    def current(self, name: str) -> Term | None:
        """Who holds ``name`` now; None when nobody does (never taken, expired, released)."""
        with transaction(self._engine, write=False) as conn:
            row = conn.execute(select(leases).where(leases.c.name == name)).one_or_none()
        if row is None or row.expires_at <= self._clock():
            return None
        return Term(row.name, row.holder, row.epoch, row.expires_at)

    @contextmanager
    def fenced(self, term: Term) -> Iterator[Connection]:
        """A write transaction that runs only while ``term`` is the lease's: raises
        ``LeaseLost`` (and writes nothing) otherwise. The lease's row stays locked until the
        block ends, so no contender takes it over between the check and the writes."""
        with transaction(self._engine) as conn:
            self.check(conn, term)
            yield conn

    def check(self, conn: Connection, term: Term) -> None:
        """In the caller's write transaction: ``LeaseLost`` unless ``term`` is still the
        lease's; the lease's row stays locked until that transaction ends."""
        row = _locked(conn, term.name)
        if (
            row is None
            or row.holder != term.holder
            or row.epoch != term.epoch
            or row.expires_at <= self._clock()
        ):
            current = "nobody" if row is None else f"{row.holder} at epoch {row.epoch}"
            raise LeaseLost(
                f"lease {term.name!r}: epoch {term.epoch} of {term.holder} is over "
                f"(held by {current})"
            )


def _locked(conn: Connection, name: str) -> Row[Any] | None:
    """The lease's row, locked for this transaction (Postgres: ``FOR UPDATE``; SQLite: the
    write lock ``transaction`` took at ``BEGIN IMMEDIATE``)."""
    query = select(leases).where(leases.c.name == name)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).one_or_none()


JITTER = 1.2
"""How much longer than ``retry_period_s`` ``renew_deadline_s`` must be, as in client-go's
leader election: one retry may run late without the term being given up."""


@dataclass(frozen=True)
class ElectionTimings:
    """``duration_s`` > ``renew_deadline_s`` > ``JITTER`` x ``retry_period_s``, each > 0:
    a holder gives the role up (``renew_deadline_s`` without a renewal) before its lease can
    expire and a contender take it (``duration_s``)."""

    duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if min(self.duration_s, self.renew_deadline_s, self.retry_period_s) <= 0:
            raise ValueError("lease timings must be positive")
        if self.duration_s <= self.renew_deadline_s:
            raise ValueError(
                f"duration_s ({self.duration_s}) must be longer than renew_deadline_s "
                f"({self.renew_deadline_s}): else two holders could act at once"
            )
        if self.renew_deadline_s <= JITTER * self.retry_period_s:
            raise ValueError(
                f"renew_deadline_s ({self.renew_deadline_s}) must be longer than "
                f"{JITTER} x retry_period_s ({self.retry_period_s})"
            )


class Elector:
    """Contends for one lease in a thread and calls ``on_elected(term)`` when it wins and
    ``on_lost()`` when it stops holding it (lost to a contender, a renewal deadline missed,
    or ``stop``). A database error is logged and retried; a holder that cannot renew within
    ``renew_deadline_s`` gives the role up before its lease can expire elsewhere."""

    def __init__(
        self,
        store: LeaseBackend,
        name: str,
        holder: str,
        *,
        on_elected: Callable[[Term], None],
        on_lost: Callable[[], None],
        timings: ElectionTimings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.name = name
        self.holder = holder
        self.timings = timings or ElectionTimings()
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._clock = clock
        self._term: Term | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.transitions = 0
        """Times this elector became or stopped being the holder."""

    @property
    def term(self) -> Term | None:
        """The term held now, or None."""
        return self._term

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"elect-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """End contending; a held term is given up (``on_lost``) and, with ``release``,
        released so a contender takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        term = self._term
        if term is not None:
            self._lose()
            if release:
                try:
                    self.store.release(term)
                except Exception as exc:  # the lease then expires on its own
                    logger.warning("lease %s: release failed (%s)", self.name, exc)

    def _run(self) -> None:
        last_renewed = self._clock()
        while not self._stop.is_set():
            try:
                if self._term is None:
                    term = self.store.acquire(
                        self.name, self.holder, duration_s=self.timings.duration_s
                    )
                    if term is not None:
                        last_renewed = self._clock()
                        self._win(term)
                else:
                    renewed = self.store.renew(self._term, duration_s=self.timings.duration_s)
                    if renewed is None:
                        logger.warning("lease %s: lost by %s", self.name, self.holder)
                        self._lose()
                    else:
                        self._term = renewed
                        last_renewed = self._clock()
            except Exception as exc:
                if not is_transient_error(exc):
                    logger.exception("lease %s: unexpected error", self.name)
                else:
                    logger.warning("lease %s: store unavailable (%s)", self.name, exc)
            if (
                self._term is not None
                and self._clock() - last_renewed > self.timings.renew_deadline_s
            ):
                logger.warning(
                    "lease %s: no renewal in %.1f s; %s gives the role up",
                    self.name,
                    self.timings.renew_deadline_s,
                    self.holder,
                )
                self._lose()
            self._stop.wait(self.timings.retry_period_s)

    def _win(self, term: Term) -> None:
        self._term = term
        self.transitions += 1
        logger.info("lease %s: %s holds it (epoch %d)", self.name, self.holder, term.epoch)
        self._on_elected(term)

    def _lose(self) -> None:
        if self._term is None:
            return
        self._term = None
        self.transitions += 1
        self._on_lost()
