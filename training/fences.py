"""Fencing tokens in the job store, for leases held outside it (Kubernetes ``Lease`` objects,
``training.k8s_leases``).

A lease in the job store fences its own writes: ``LeaseStore.fenced`` checks the lease's row
in the write's own transaction. A ``Lease`` in Kubernetes can take no part in a transaction of
the store, so the store keeps a fence of its own: for each role, the highest epoch that has
written on its behalf. A write for a lower epoch is refused with ``LeaseLost`` and nothing of
it lands: the storage refuses tokens lower than the highest it has seen (Kleppmann's fencing
tokens, *Designing Data-Intensive Applications*, ch. 8).

    fences = FenceStore(engine)
    with fences.fenced(term) as conn:     # LeaseLost once a newer epoch has written
        conn.execute(update(jobs)...)

The fence learns of a new epoch from its first write, not from Kubernetes: until the new
holder has written, a late write of the old epoch still lands, as a slow but valid one would.
So a new holder enters ``fenced(term)`` once when elected (an empty block does), raising the
fence before it acts. The fence checks epochs only, never expiry: ``Elector`` gives the role up
before its lease can expire for a contender (``ElectionTimings``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite

from training.db import fences, transaction
from training.leases import LeaseLost, Term


class FenceStore:
    """The fences of one job store (SQLite or Postgres), one per role."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def fenced(self, term: Term) -> Iterator[Connection]:
        """A write transaction on behalf of ``term``: raises ``LeaseLost`` (and writes
        nothing) when an epoch above ``term.epoch`` has written for ``term.name``; else records
        ``term.epoch`` as the highest (never lowered) and yields the connection. The fence's
        row stays locked until the block ends, so no newer epoch writes in between; a block
        that raises rolls the recorded epoch back with the rest of its writes."""
        with transaction(self._engine) as conn:
            self.check(conn, term)
            yield conn

    def check(self, conn: Connection, term: Term) -> None:
        """In the caller's write transaction: ``LeaseLost`` when a newer epoch has written,
        else ``term.epoch`` recorded as the highest (rolled back with the transaction)."""
        highest = _locked_epoch(conn, term)
        if highest > term.epoch:
            raise LeaseLost(
                f"fence {term.name!r}: epoch {term.epoch} of {term.holder} is over "
                f"(epoch {highest} has written)"
            )
        if highest < term.epoch:
            conn.execute(update(fences).where(fences.c.name == term.name).values(epoch=term.epoch))


def _locked_epoch(conn: Connection, term: Term) -> int:
    """The highest epoch of ``term.name``'s fence, its row locked for this transaction; a fence
    seen for the first time is made at ``term.epoch``.

    The row is made with "insert, or nothing if it exists": two first writers then never both
    insert (on Postgres the second waits for the first's commit, then does nothing). Postgres
    locks it with ``FOR UPDATE``; SQLite's write lock, taken at ``BEGIN IMMEDIATE`` by
    ``transaction``, already covers the whole database.
    """
    values = {"name": term.name, "epoch": term.epoch}
    if conn.dialect.name == "postgresql":
        conn.execute(postgresql.insert(fences).values(**values).on_conflict_do_nothing())
        query = select(fences.c.epoch).where(fences.c.name == term.name).with_for_update()
    else:
        conn.execute(sqlite.insert(fences).values(**values).on_conflict_do_nothing())
        query = select(fences.c.epoch).where(fences.c.name == term.name)
    return int(conn.execute(query).scalar_one())
