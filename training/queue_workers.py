"""Workers on the durable work queue (Burns ch. 11): Ray actors that lease, work, ack.

A parallel stage puts one item per unit of work (a corpus shard, an ensemble member) on its
own queue, starts ``stage_workers`` ``QueueWorker`` actors, and waits until every item is done:

    results = run_queue_stage(context, "tokenise", items, handler="lm.tokenise")

Each worker leases the oldest ready item, heartbeats while its handler runs (a thread), and
acks the handler's result, or nacks the error so the item is retried after a backoff and
dead-lettered after ``max_attempts``. A worker that dies stops heartbeating; the scheduler's
reaper takes its lease back and another worker finishes the item. Only registered handlers
run (each trainer's, by name, from ``training.trainers.registry``): a payload is data, never
code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from training.db import create_db_engine
from training.stages import StageContext
from training.trainers.registry import TRAINERS, Handler
from training.work_queue import ItemState, Lease, WorkQueue

logger = logging.getLogger(__name__)


def queue_name(job_id: str, stage: str) -> str:
    """A stage's own queue: ``<job>/<stage>``; ``purge(f"{job}/")`` empties a job's queues."""
    return f"{job_id}/{stage}"


@dataclass(frozen=True, kw_only=True)
class QueueItem:
    key: str
    """Idempotency key within the stage's queue (``shard-3``): a re-run puts nothing twice."""
    payload: dict[str, Any]


class QueueWorker:
    """The body of a worker actor: ``ray.remote(QueueWorker)``; ``run`` until the queue is
    drained. Works without Ray too (the unit tests call ``run`` in a thread)."""

    def __init__(self, db: str | WorkQueue, worker: str, *, schema: str | None = None) -> None:
        """``db``: the store's URL (a worker actor opens its own engine), or a queue."""
        self._queue = (
            db if isinstance(db, WorkQueue) else WorkQueue(create_db_engine(db, schema=schema))
        )
        self.worker = worker

    def run(
        self, queue: str, handler: str, *, lease_s: float = 60.0, idle_poll_s: float = 0.2
    ) -> int:
        """Work items of ``queue`` until none is ready or leased; how many this worker acked.

        An item waiting out a retry backoff, or leased by another worker that may yet die,
        keeps this worker polling, so a lost lease that the reaper returns still gets done."""
        work = TRAINERS.handler(handler)  # ValueError for a name no trainer registered
        acked = 0
        while True:
            lease = self._queue.lease(queue, self.worker, lease_s)
            if lease is None:
                counts = self._queue.counts(queue)
                if counts.ready == 0 and counts.leased == 0:
                    return acked
                time.sleep(idle_poll_s)
                continue
            acked += self._work_one(lease, work, lease_s)

    def _work_one(self, lease: Lease, work: Handler, lease_s: float) -> int:
        stop = threading.Event()

        def heartbeat() -> None:
            current: Lease | None = lease
            # renew at a third of the lease: two renewals may fail before it lapses
            while current is not None and not stop.wait(lease_s / 3):
                current = self._queue.heartbeat(current, lease_s)

        beat = threading.Thread(target=heartbeat, name=f"heartbeat-{self.worker}", daemon=True)
        beat.start()
        try:
            result = work(dict(lease.payload))
        except Exception as exc:  # the item's failure, not the worker's: retry or dead-letter
            stop.set()
            # the queue's name is <job>/<stage>: the job id is in the line
            logger.warning(
                "%s: item %s failed on attempt %d",
                lease.queue,
                lease.item_id.value,
                lease.attempt,
                exc_info=True,
            )
            self._queue.nack(lease, f"{type(exc).__name__}: {exc}")
            return 0
        finally:
            stop.set()
            beat.join()
        # False when the lease was reaped and handed on: the other holder's ack counts
        return int(self._queue.ack(lease, result))


def run_queue_stage(
    context: StageContext[Any],
    stage: str,
    items: Sequence[QueueItem],
    *,
    handler: str,
    max_attempts: int = 3,
    poll_interval_s: float = 0.3,
) -> list[dict[str, Any]]:
    """Put ``items`` on the stage's queue, work them with the job's queue workers, and return
    their results in ``items`` order. ``RuntimeError`` naming the item if one is dead-lettered;
    ``JobStopped`` if the job is cancelled meanwhile (the workers are stopped either way)."""
    queue: WorkQueue = context.services["queue"]
    start_workers: Callable[[int, str, str], Any] = context.services["workers"].queue_workers
    name = queue_name(context.job_id, stage)
    ids = [
        queue.put(name, item.payload, max_attempts=max_attempts, idempotency_key=item.key)
        for item in items
    ]
    total = len(ids)
    count = max(1, min(context.spec.stage_workers, total))
    context.log(f"stage {stage}: {total} items on the queue, {count} workers")
    group = start_workers(count, name, handler)
    try:
        while True:
            context.check_stop()
            counts = queue.counts(name)
            context.progress(counts.done / total if total else 1.0)
            if counts.dead:
                dead = [i for i in queue.items(name) if i.state == ItemState.DEAD]
                raise RuntimeError(
                    f"stage {stage}: item {dead[0].payload.get('name', dead[0].id.value)} failed "
                    f"{dead[0].attempts} times; last error: {dead[0].last_error}"
                )
            if counts.done == total:
                break
            group.keep_alive()  # a worker that died is replaced; its lease comes back by reaping
            time.sleep(poll_interval_s)
    finally:
        group.stop()
    by_id = {item.id: item for item in queue.items(name)}
    # every handler returns a dict; only an ack made without one (not ours) stores None
    return [by_id[item_id].result or {} for item_id in ids]
