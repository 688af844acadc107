"""The work queue (Burns ch. 11): durable, in the job store, leased with fencing epochs.

A producer ``put``s work items; a worker ``lease``s the oldest ready one for ``lease_s``,
``heartbeat``s while it works, and ends with ``ack`` (done, with its result) or ``nack``
(failed: retried after a backoff, or dead-lettered once ``max_attempts`` leases are spent).
A reaper calls ``reap`` to take back leases whose holder stopped heartbeating.

    queue = WorkQueue(engine)
    queue.put("tokenise", {"shard": 3}, max_attempts=3)
    lease = queue.lease("tokenise", worker="w1", lease_s=30)
    if lease is not None:
        queue.ack(lease, {"tokens": 1024})

Exactly once: every lease carries the item's lease epoch, a fencing token that moves on
whenever ownership changes (a new lease, a reap). ``ack``, ``nack`` and ``heartbeat`` are one
conditional write each, "where the epoch is still mine and the item still leased", so a
holder whose lease was reaped and handed on, or a second ack, changes nothing and returns
``False``. The result is written by the same statement, in the same transaction, as the
ack; ``ack(..., apply=)`` runs the caller's own store writes there too.

Every lease counts as an attempt, taken when it is handed out: a worker that dies without a
``nack`` still spends one, so a poison item cannot cycle forever through the reaper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, Row, Update, case, func, select, update
from sqlalchemy.exc import IntegrityError

from training.db import transaction, work_items

Payload = dict[str, Any]
"""A work item's payload or result: a JSON object (stored as JSON, read back as a dict)."""


class ItemState(StrEnum):
    READY = "ready"
    """Waiting to be leased, once ``available_at`` has passed (retries wait out a backoff)."""
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"
    """The dead letter state: ``max_attempts`` leases spent; ``last_error`` says why."""


@dataclass(frozen=True)
class ItemId:
    value: int


@dataclass(frozen=True, kw_only=True)
class Lease:
    """A time-limited claim on one work item, held by ``worker``."""

    item_id: ItemId
    queue: str
    worker: str
    epoch: int
    """The fencing token: the item's lease epoch when this lease was granted."""
    payload: Payload
    attempt: int
    """1 for the first lease of the item, 2 for its first retry, ..."""
    expires_at: float
    """Clock seconds after which the reaper may take the item back."""


@dataclass(frozen=True, kw_only=True)
class WorkItem:
    """A read-only view of one item, as ``get`` finds it."""

    id: ItemId
    queue: str
    state: ItemState
    payload: Payload
    attempts: int
    max_attempts: int
    available_at: float
    lease_owner: str | None
    lease_epoch: int
    lease_expires_at: float | None
    result: Payload | None
    last_error: str | None


@dataclass(frozen=True, kw_only=True)
class QueueCounts:
    ready: int = 0
    leased: int = 0
    done: int = 0
    dead: int = 0


class IdempotencyKeyReused(ValueError):
    """A ``put`` reused an idempotency key with a different payload."""


def retry_delay_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt`` (1-based).

    Exponential, capped: base 1 s, cap 60 s -> 1, 2, 4, 8, 16, 32, 60, 60, ...
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    # the exponent is bounded so a large attempt count cannot overflow a float
    return min(cap_s, base_s * 2.0 ** min(attempt - 1, 64))


class WorkQueue:
    """The durable work queue over the store's ``work_items`` table (see the module docstring).

    ``clock`` returns seconds (``time.time`` by default); every time the queue writes comes
    from it, so tests move time by hand.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s

    def put(
        self,
        queue: str,
        payload: Payload,
        *,
        max_attempts: int,
        idempotency_key: str | None = None,
    ) -> ItemId:
        """Enqueue ``payload`` (JSON-serialisable) on ``queue``; ready at once.

        With ``idempotency_key``, a second put of the same key on the same queue returns the
        first item's id and enqueues nothing; a different payload raises
        ``IdempotencyKeyReused``.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if idempotency_key is not None:
            existing = self._find_keyed(queue, idempotency_key, payload)
            if existing is not None:
                return existing
        now = self._clock()
        try:
            with transaction(self._engine) as conn:
                new_id = conn.execute(
                    work_items.insert()
                    .values(
                        queue=queue,
                        payload=payload,
                        state=ItemState.READY.value,
                        attempts=0,
                        max_attempts=max_attempts,
                        available_at=now,
                        lease_epoch=0,
                        idempotency_key=idempotency_key,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(work_items.c.id)
                ).scalar_one()
        except IntegrityError:
            # another producer put the same key between our look and our insert
            if idempotency_key is None:
                raise
            existing = self._find_keyed(queue, idempotency_key, payload)
            if existing is None:
                raise
            return existing
        return ItemId(new_id)

    def _find_keyed(self, queue: str, key: str, payload: Payload) -> ItemId | None:
        with transaction(self._engine, write=False) as conn:
            row = conn.execute(
                select(work_items.c.id, work_items.c.payload).where(
                    work_items.c.queue == queue, work_items.c.idempotency_key == key
                )
            ).one_or_none()
        if row is None:
            return None
        if row.payload != payload:
            raise IdempotencyKeyReused(f"key {key!r} on queue {queue!r} has another payload")
        return ItemId(row.id)

    def lease(self, queue: str, worker: str, lease_s: float) -> Lease | None:
        """Lease the oldest ready item of ``queue`` to ``worker`` for ``lease_s``; None if none.

        Postgres: ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent workers pass over each
        other's rows instead of waiting. SQLite: the write transaction (``BEGIN IMMEDIATE``)
        lets one leaser at a time in.
        """
        now = self._clock()
        expires_at = now + lease_s
        with transaction(self._engine) as conn:
            item_id = conn.execute(
                select(work_items.c.id)
                .where(
                    work_items.c.queue == queue,
                    work_items.c.state == ItemState.READY.value,
                    work_items.c.available_at <= now,
                )
                .order_by(work_items.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if item_id is None:
                return None
            row = conn.execute(
                update(work_items)
                .where(work_items.c.id == item_id)
                .values(
                    state=ItemState.LEASED.value,
                    attempts=work_items.c.attempts + 1,
                    lease_epoch=work_items.c.lease_epoch + 1,
                    lease_owner=worker,
                    lease_expires_at=expires_at,
                    updated_at=now,
                )
                .returning(work_items.c.payload, work_items.c.attempts, work_items.c.lease_epoch)
            ).one()
        return Lease(
            item_id=ItemId(item_id),
            queue=queue,
            worker=worker,
            epoch=row.lease_epoch,
            payload=row.payload,
            attempt=row.attempts,
            expires_at=expires_at,
        )

    def heartbeat(self, lease: Lease, lease_s: float) -> Lease | None:
        """Extend ``lease`` to ``lease_s`` from now; the renewed lease, or None if it was lost."""
        now = self._clock()
        with transaction(self._engine) as conn:
            changed = conn.execute(
                self._fenced_update(lease).values(lease_expires_at=now + lease_s, updated_at=now)
            ).rowcount
        return replace(lease, expires_at=now + lease_s) if changed == 1 else None

    def ack(
        self,
        lease: Lease,
        result: Payload | None = None,
        *,
        apply: Callable[[Connection], None] | None = None,
    ) -> bool:
        """Mark the item done with ``result``; True if this ack took effect.

        False, and nothing written, when the lease is no longer current: already acked or
        nacked, or reaped (and perhaps leased to another worker). The epoch decides, not the
        clock: a lease past ``expires_at`` that no reaper has taken yet still acks, since no
        one else can hold the item. ``apply`` runs in the ack's
        transaction, only when the ack takes effect: store writes that must happen exactly
        once with it.
        """
        now = self._clock()
        with transaction(self._engine) as conn:
            changed = conn.execute(
                self._fenced_update(lease).values(
                    state=ItemState.DONE.value,
                    result=result,
                    lease_expires_at=None,
                    updated_at=now,
                )
            ).rowcount
            if changed == 1 and apply is not None:
                apply(conn)
        return changed == 1

    def nack(self, lease: Lease, error: str) -> bool:
        """Record a failed attempt; True if this nack took effect (the lease was current).

        The item is retried after ``retry_delay_s(attempt)``, or goes to the dead letter state
        with ``error`` once its ``max_attempts`` leases are spent.
        """
        now = self._clock()
        with transaction(self._engine) as conn:
            row = conn.execute(
                select(work_items.c.attempts, work_items.c.max_attempts)
                .where(
                    work_items.c.id == lease.item_id.value,
                    work_items.c.lease_epoch == lease.epoch,
                    work_items.c.state == ItemState.LEASED.value,
                )
                .with_for_update()
            ).one_or_none()
            if row is None:
                return False
            if row.attempts >= row.max_attempts:
                state, available_at = ItemState.DEAD, now
            else:
                delay_s = retry_delay_s(
                    row.attempts, base_s=self._retry_base_s, cap_s=self._retry_cap_s
                )
                state, available_at = ItemState.READY, now + delay_s
            conn.execute(
                self._fenced_update(lease).values(
                    state=state.value,
                    available_at=available_at,
                    last_error=error,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
        return True

    def reap(self, now: float | None = None) -> int:
        """Take back every lease that expired before ``now`` (the clock's, by default).

        Each goes back to ready at once, or to the dead letter state if that lease was its
        last attempt; its epoch moves on, so the old holder can no longer ack. Returns how many
        leases were taken back.
        """
        now = self._clock() if now is None else now
        last_attempt = work_items.c.attempts >= work_items.c.max_attempts
        with transaction(self._engine) as conn:
            return conn.execute(
                update(work_items)
                .where(
                    work_items.c.state == ItemState.LEASED.value,
                    work_items.c.lease_expires_at < now,
                )
                .values(
                    state=case((last_attempt, ItemState.DEAD.value), else_=ItemState.READY.value),
                    last_error="lease expired, held by " + work_items.c.lease_owner,
                    lease_epoch=work_items.c.lease_epoch + 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    available_at=now,
                    updated_at=now,
                )
            ).rowcount

    def get(self, item_id: ItemId) -> WorkItem | None:
        with transaction(self._engine, write=False) as conn:
            row = conn.execute(
                select(work_items).where(work_items.c.id == item_id.value)
            ).one_or_none()
        return None if row is None else _item_from_row(row)

    def items(self, queue: str) -> list[WorkItem]:
        """Every item of ``queue``, oldest first (a stage reads its results back in order)."""
        with transaction(self._engine, write=False) as conn:
            rows = conn.execute(
                select(work_items).where(work_items.c.queue == queue).order_by(work_items.c.id)
            ).all()
        return [_item_from_row(row) for row in rows]

    def purge(self, queue_prefix: str) -> int:
        """Delete every item, in any state, of the queues whose names start with
        ``queue_prefix`` (a cancelled job's queues); how many went."""
        escaped = queue_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with transaction(self._engine) as conn:
            return conn.execute(
                work_items.delete().where(work_items.c.queue.like(escaped + "%", escape="\\"))
            ).rowcount

    def counts(self, queue: str) -> QueueCounts:
        """How many items of ``queue`` are in each state."""
        with transaction(self._engine, write=False) as conn:
            rows = conn.execute(
                select(work_items.c.state, func.count())
                .where(work_items.c.queue == queue)
                .group_by(work_items.c.state)
            ).all()
        return QueueCounts(**dict(rows))

    @staticmethod
    def _fenced_update(lease: Lease) -> Update:
        # the fence: only the current holder's epoch, on an item still leased, matches
        return update(work_items).where(
            work_items.c.id == lease.item_id.value,
            work_items.c.lease_epoch == lease.epoch,
            work_items.c.state == ItemState.LEASED.value,
        )


def _item_from_row(row: Row[Any]) -> WorkItem:
    return WorkItem(
        id=ItemId(row.id),
        queue=row.queue,
        state=ItemState(row.state),
        payload=row.payload,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        available_at=row.available_at,
        lease_owner=row.lease_owner,
        lease_epoch=row.lease_epoch,
        lease_expires_at=row.lease_expires_at,
        result=row.result,
        last_error=row.last_error,
    )
