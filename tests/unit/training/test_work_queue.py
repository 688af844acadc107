"""The durable work queue (Burns ch. 11): lease, heartbeat, ack, retry, dead letter, fencing.

Every test runs on SQLite and on PostgreSQL (the ``db_engine`` fixture); time moves by hand.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Connection, Engine

from training.work_queue import (
    IdempotencyKeyReused,
    ItemState,
    QueueCounts,
    WorkQueue,
    retry_delay_s,
)


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, start_s: float = 1_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(db_engine: Engine, clock: FakeClock) -> WorkQueue:
    return WorkQueue(db_engine, clock=clock, retry_base_s=1.0, retry_cap_s=60.0)


@pytest.mark.parametrize(
    ("attempt", "expected_s"),
    [
        (1, 1.0),  # base
        (2, 2.0),  # 1 * 2
        (3, 4.0),  # 1 * 2**2
        (6, 32.0),  # 1 * 2**5
        (7, 60.0),  # 64 capped at 60
        (10_000, 60.0),  # no overflow, still the cap
    ],
)
def test_retry_delay_doubles_per_attempt_up_to_the_cap(attempt: int, expected_s: float) -> None:
    assert retry_delay_s(attempt, base_s=1.0, cap_s=60.0) == expected_s


def test_retry_delay_refuses_attempt_zero() -> None:
    with pytest.raises(ValueError, match="1-based"):
        retry_delay_s(0, base_s=1.0, cap_s=60.0)


def test_lease_hands_out_the_oldest_ready_item_and_ack_stores_its_result(
    queue: WorkQueue,
) -> None:
    first = queue.put("shards", {"n": 1}, max_attempts=3)
    queue.put("shards", {"n": 2}, max_attempts=3)
    queue.put("other", {"n": 0}, max_attempts=3)

    lease = queue.lease("shards", worker="w1", lease_s=30)
    assert lease is not None
    assert (lease.item_id, lease.payload, lease.attempt, lease.epoch) == (first, {"n": 1}, 1, 1)
    assert queue.ack(lease, {"tokens": 7}) is True

    item = queue.get(first)
    assert item is not None
    assert (item.state, item.result) == (ItemState.DONE, {"tokens": 7})
    assert queue.counts("shards") == QueueCounts(ready=1, done=1)


def test_lease_on_an_empty_queue_returns_none(queue: WorkQueue) -> None:
    assert queue.lease("shards", worker="w1", lease_s=30) is None


def test_expired_lease_is_reaped_back_to_ready_and_counts_as_an_attempt(
    queue: WorkQueue, clock: FakeClock
) -> None:
    item_id = queue.put("shards", {"n": 1}, max_attempts=3)
    lease = queue.lease("shards", worker="w1", lease_s=30)
    assert lease is not None

    clock.advance(29)
    assert queue.reap() == 0  # 29 s < 30 s lease: still held
    clock.advance(2)
    assert queue.reap() == 1  # 31 s > 30 s: taken back

    item = queue.get(item_id)
    assert item is not None
    assert (item.state, item.attempts) == (ItemState.READY, 1)
    assert item.last_error == "lease expired, held by w1"
    again = queue.lease("shards", worker="w2", lease_s=30)
    assert again is not None
    assert (again.item_id, again.attempt) == (item_id, 2)
    assert again.epoch > lease.epoch


def test_heartbeat_keeps_a_lease_from_being_reaped(queue: WorkQueue, clock: FakeClock) -> None:
    queue.put("shards", {"n": 1}, max_attempts=3)
    lease = queue.lease("shards", worker="w1", lease_s=30)
    assert lease is not None

    clock.advance(20)
    renewed = queue.heartbeat(lease, lease_s=30)
    assert renewed is not None
    assert renewed.expires_at == clock() + 30
    clock.advance(20)  # 40 s after the lease, 20 s after the heartbeat
    assert queue.reap() == 0
    assert queue.ack(renewed) is True


def test_duplicate_ack_is_ignored_and_says_so(queue: WorkQueue) -> None:
    item_id = queue.put("shards", {"n": 1}, max_attempts=3)
    lease = queue.lease("shards", worker="w1", lease_s=30)
    assert lease is not None

    assert queue.ack(lease, {"first": True}) is True
    assert queue.ack(lease, {"second": True}) is False
    assert queue.nack(lease, "late failure") is False

    item = queue.get(item_id)
    assert item is not None
    assert (item.state, item.result, item.last_error) == (ItemState.DONE, {"first": True}, None)


def test_stale_lease_cannot_ack_heartbeat_or_nack_after_it_was_reaped_and_re_leased(
    queue: WorkQueue, clock: FakeClock
) -> None:
    item_id = queue.put("shards", {"n": 1}, max_attempts=3)
    stale = queue.lease("shards", worker="slow", lease_s=30)
    assert stale is not None
    clock.advance(31)
    assert queue.reap() == 1
    current = queue.lease("shards", worker="fast", lease_s=30)
    assert current is not None

    assert queue.heartbeat(stale, lease_s=30) is None
    assert queue.ack(stale, {"from": "slow"}) is False
    assert queue.nack(stale, "slow failed") is False
    assert queue.ack(current, {"from": "fast"}) is True

    item = queue.get(item_id)
    assert item is not None
    assert (item.state, item.result) == (ItemState.DONE, {"from": "fast"})


def test_stale_ack_does_not_run_its_apply_hook(queue: WorkQueue, clock: FakeClock) -> None:
    queue.put("shards", {"n": 1}, max_attempts=3)
    stale = queue.lease("shards", worker="slow", lease_s=30)
    assert stale is not None
    clock.advance(31)
    queue.reap()
    applied: list[str] = []

    def record(conn: Connection) -> None:
        applied.append("applied")

    assert queue.ack(stale, apply=record) is False
    assert applied == []


def test_nack_retries_after_an_exponential_backoff(queue: WorkQueue, clock: FakeClock) -> None:
    item_id = queue.put("shards", {"n": 1}, max_attempts=5)

    lease = queue.lease("shards", worker="w1", lease_s=30)
    assert lease is not None
    assert queue.nack(lease, "boom 1") is True  # attempt 1 failed: wait 1 s
    assert queue.lease("shards", worker="w1", lease_s=30) is None
    clock.advance(1)

    lease = queue.lease("shards", worker="w1", lease_s=30)
    assert lease is not None
    assert lease.attempt == 2
    assert queue.nack(lease, "boom 2") is True  # attempt 2 failed: wait 2 s
    clock.advance(1.5)
    assert queue.lease("shards", worker="w1", lease_s=30) is None
    clock.advance(0.5)

    lease = queue.lease("shards", worker="w1", lease_s=30)
    assert lease is not None
    assert lease.attempt == 3
    item = queue.get(item_id)
    assert item is not None
    assert item.last_error == "boom 2"


def test_item_goes_to_the_dead_letter_state_after_max_attempts(
    queue: WorkQueue, clock: FakeClock
) -> None:
    item_id = queue.put("shards", {"n": 1}, max_attempts=2)
    first = queue.lease("shards", worker="w1", lease_s=30)
    assert first is not None
    queue.nack(first, "boom 1")
    clock.advance(1)
    second = queue.lease("shards", worker="w1", lease_s=30)
    assert second is not None
    queue.nack(second, "boom 2")  # 2 of 2 attempts spent
    clock.advance(3600)

    assert queue.lease("shards", worker="w1", lease_s=30) is None
    item = queue.get(item_id)
    assert item is not None
    assert (item.state, item.attempts, item.last_error) == (ItemState.DEAD, 2, "boom 2")
    assert queue.counts("shards") == QueueCounts(dead=1)


def test_reaping_the_last_attempt_dead_letters_the_item(queue: WorkQueue, clock: FakeClock) -> None:
    item_id = queue.put("shards", {"n": 1}, max_attempts=1)
    assert queue.lease("shards", worker="w1", lease_s=30) is not None
    clock.advance(31)
    assert queue.reap() == 1

    item = queue.get(item_id)
    assert item is not None
    assert item.state == ItemState.DEAD


def test_idempotency_key_returns_the_same_id_and_enqueues_once(queue: WorkQueue) -> None:
    first = queue.put("shards", {"n": 1}, max_attempts=3, idempotency_key="shard-1")
    again = queue.put("shards", {"n": 1}, max_attempts=3, idempotency_key="shard-1")
    other_queue = queue.put("merge", {"n": 1}, max_attempts=3, idempotency_key="shard-1")

    assert again == first
    assert other_queue != first
    assert queue.counts("shards") == QueueCounts(ready=1)


def test_idempotency_key_reused_with_another_payload_is_refused(queue: WorkQueue) -> None:
    queue.put("shards", {"n": 1}, max_attempts=3, idempotency_key="shard-1")
    with pytest.raises(IdempotencyKeyReused):
        queue.put("shards", {"n": 2}, max_attempts=3, idempotency_key="shard-1")


def test_two_concurrent_workers_never_hold_the_same_item_and_ack_each_exactly_once(
    queue: WorkQueue, db_engine: Engine
) -> None:
    n_items = 40
    ids = {queue.put("shards", {"n": i}, max_attempts=3) for i in range(n_items)}
    held: set[int] = set()
    acked: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()
    start = threading.Barrier(2)

    applied: list[int] = []

    def work(worker: str) -> None:
        try:
            start.wait()
            while (lease := queue.lease("shards", worker=worker, lease_s=300)) is not None:
                with guard:
                    assert lease.item_id.value not in held, "two workers hold one item"
                    held.add(lease.item_id.value)
                item = lease.item_id.value
                # the hook stands for a stage's own store write, committed with the ack
                assert queue.ack(lease, {"by": worker}, apply=lambda _c, i=item: applied.append(i))
                with guard:
                    held.discard(lease.item_id.value)
                    acked.append(lease.item_id.value)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(acked) == sorted(i.value for i in ids)  # 40 acks, one per item
    assert sorted(applied) == sorted(acked)  # and each ack's hook ran once
    assert queue.counts("shards") == QueueCounts(done=n_items)


def test_items_lists_a_queue_in_put_order_with_results(queue: WorkQueue) -> None:
    first = queue.put("stage", {"n": 1}, max_attempts=3)
    queue.put("stage", {"n": 2}, max_attempts=3)
    queue.put("other", {"n": 3}, max_attempts=3)
    lease = queue.lease("stage", worker="w", lease_s=30)
    assert lease is not None
    assert lease.item_id == first
    queue.ack(lease, {"done": 1})
    items = queue.items("stage")
    assert [i.payload for i in items] == [{"n": 1}, {"n": 2}]
    assert [i.result for i in items] == [{"done": 1}, None]


def test_purge_deletes_only_the_queues_under_a_prefix(queue: WorkQueue) -> None:
    queue.put("job_1/tokenise", {"n": 1}, max_attempts=3)
    queue.put("job_1/train", {"n": 2}, max_attempts=3)
    queue.put("jobX1/tokenise", {"n": 3}, max_attempts=3)  # '_' is literal, not a wildcard
    queue.put("job_10/tokenise", {"n": 4}, max_attempts=3)
    assert queue.purge("job_1/") == 2
    assert queue.items("job_1/tokenise") == []
    assert len(queue.items("jobX1/tokenise")) == 1
    assert len(queue.items("job_10/tokenise")) == 1
