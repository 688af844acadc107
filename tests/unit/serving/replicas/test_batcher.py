"""The replica's batcher: planning, adaptive waits, admission, expiry, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fake_rows import Items as Ints
from fake_rows import items as ints

from serving.messages import Overloaded
from serving.replicas.admission import Admission, retry_after_s
from serving.replicas.batcher import Batcher, BatchPolicy, Expired, batch_wait_s, plan_batch


@pytest.mark.parametrize(
    ("sizes", "max_batch", "expected"),
    [
        ([], 32, 0),
        ([1], 32, 1),
        ([10, 10, 20], 32, 2),  # 10 + 10 = 20; + 20 = 40 > 32
        ([40, 1], 32, 1),  # an oversized request runs alone (in chunks)
        ([1] * 40, 32, 32),
    ],
)
def test_plan_batch_takes_whole_requests_that_fit(sizes, max_batch, expected):
    assert plan_batch(sizes, max_batch) == expected


def test_idle_engine_runs_a_lone_request_at_once_when_nothing_else_is_coming():
    # 50 inputs/s x 5 ms = 0.25 expected arrivals < 1 -> no wait
    assert (
        batch_wait_s(queued_inputs=1, max_batch_size=32, arrivals_per_s=50, max_wait_s=0.005) == 0.0
    )


def test_busy_stream_waits_for_a_fuller_batch_but_never_past_max_wait():
    # 2000/s x 5 ms = 10 expected; filling 31 more takes 15.5 ms > 5 ms -> wait 5 ms
    assert (
        batch_wait_s(queued_inputs=1, max_batch_size=32, arrivals_per_s=2000, max_wait_s=0.005)
        == 0.005
    )
    # 31 more at 100k/s takes 0.31 ms < 5 ms -> wait only that
    wait = batch_wait_s(
        queued_inputs=1, max_batch_size=32, arrivals_per_s=100_000, max_wait_s=0.005
    )
    assert wait == pytest.approx(31 / 100_000)


def test_full_batch_never_waits():
    assert (
        batch_wait_s(queued_inputs=32, max_batch_size=32, arrivals_per_s=1e6, max_wait_s=1) == 0.0
    )


def test_retry_after_is_the_drain_time_rounded_up_and_at_least_one_second():
    assert retry_after_s(600, 300.0) == 2
    assert retry_after_s(601, 300.0) == 3
    assert retry_after_s(5, 300.0) == 1
    assert retry_after_s(5, 0.0) == 1


class RecordingEngine:
    """Doubles numbers; records batch sizes; can be held to let a queue build up."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()  # set while a batch waits at the gate

    def run(self, batch: list[int]) -> Ints:
        self.held.set()
        self.gate.wait(5)
        self.batches.append(len(batch))
        return Ints(tuple(2 * x for x in batch))


def make(run, *, max_batch_size: int, max_queued: int = 100) -> Batcher:
    policy = BatchPolicy(max_batch_size=max_batch_size, max_wait_s=0.0)
    return Batcher(run, policy, admission=Admission("m", max_queued))


def test_requests_queued_behind_a_running_batch_leave_together_in_order():
    engine = RecordingEngine()

    async def scenario() -> list[Ints]:
        batcher = make(engine.run, max_batch_size=8)
        engine.gate.clear()
        first = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.05)  # the engine holds request 0
        rest = [asyncio.create_task(batcher.submit([i, i + 100])) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        results = await asyncio.gather(first, *rest)
        batcher.close()
        return results

    results = asyncio.run(scenario())
    assert results[0] == ints(0)
    assert results[1:] == [ints(2 * i, 2 * (i + 100)) for i in range(1, 6)]
    # 1 alone, then 5 requests x 2 inputs = 10 > 8: four (8 inputs) then one (2)
    assert engine.batches == [1, 8, 2]


def test_oversized_request_runs_in_chunks_and_comes_back_whole():
    engine = RecordingEngine()

    async def scenario() -> Ints:
        batcher = make(engine.run, max_batch_size=4)
        out = await batcher.submit(list(range(10)))
        batcher.close()
        return out

    assert asyncio.run(scenario()) == Ints(tuple(2 * x for x in range(10)))
    assert engine.batches == [4, 4, 2]


def test_full_queue_refuses_with_retry_after():
    engine = RecordingEngine()

    async def scenario() -> None:
        batcher = make(engine.run, max_batch_size=4, max_queued=5)
        engine.gate.clear()
        held = asyncio.create_task(batcher.submit([1, 2, 3]))
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit([4, 5, 6])  # 3 admitted + 3 = 6 > 5
        assert refused.value.retry_after_s >= 1
        engine.gate.set()
        assert await held == ints(2, 4, 6)
        assert await batcher.submit([4, 5]) == ints(8, 10)  # room again once drained
        batcher.close()

    asyncio.run(scenario())


def test_engine_failure_reaches_every_caller_in_the_batch_and_the_batcher_goes_on():
    calls = {"n": 0}

    def flaky(batch: list[int]) -> Ints:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        return Ints(tuple(batch))

    async def scenario() -> None:
        batcher = make(flaky, max_batch_size=4, max_queued=10)
        with pytest.raises(ValueError, match="boom"):
            await batcher.submit([1])
        assert await batcher.submit([2]) == ints(2)
        assert (batcher.queued_inputs, batcher.admitted_inputs) == (0, 0)
        batcher.close()

    asyncio.run(scenario())


def test_a_dead_batching_loop_fails_the_health_check():
    async def scenario() -> None:
        batcher = make(lambda b: Ints(tuple(b)), max_batch_size=4, max_queued=10)
        batcher.check()  # not started yet: healthy
        assert await batcher.submit([1]) == ints(1)
        batcher.check()  # running: healthy
        batcher.close()  # the loop is cancelled, as if it had crashed
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="batching loop stopped"):
            batcher.check()

    asyncio.run(scenario())


def test_a_request_whose_deadline_passes_in_the_queue_is_skipped_not_computed():
    engine = RecordingEngine()
    expired_inputs: list[int] = []

    async def scenario() -> None:
        policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0)
        batcher = Batcher(
            engine.run, policy, admission=Admission("m", 100), on_expired=expired_inputs.append
        )
        engine.gate.clear()
        running = asyncio.create_task(batcher.submit([1]))
        await asyncio.to_thread(engine.held.wait, 5)  # the engine holds request [1]
        soon = time.time() + 0.05
        late = asyncio.create_task(batcher.submit([2, 3], deadline_s=soon))
        kept = asyncio.create_task(batcher.submit([4], deadline_s=time.time() + 60))
        await asyncio.sleep(max(0.0, soon - time.time()) + 0.01)  # [2, 3]'s deadline passes
        engine.gate.set()
        assert await running == ints(2)
        with pytest.raises(Expired):
            await late
        assert await kept == ints(8)
        assert batcher.admitted_inputs == 0  # the skipped inputs left admission too
        batcher.close()

    asyncio.run(scenario())
    # 1 ran alone, then only [4]: the 2 expired inputs never reached the engine
    assert engine.batches == [1, 1]
    assert expired_inputs == [2]


def test_a_request_whose_caller_went_away_is_not_computed():
    engine = RecordingEngine()

    async def scenario() -> None:
        batcher = make(engine.run, max_batch_size=8)
        engine.gate.clear()
        running = asyncio.create_task(batcher.submit([1]))
        await asyncio.to_thread(engine.held.wait, 5)
        gone = asyncio.create_task(batcher.submit([2, 3]))
        kept = asyncio.create_task(batcher.submit([4]))
        await asyncio.sleep(0)  # both queued
        gone.cancel()  # the gateway gave up on it (a 504, a lost hedge)
        engine.gate.set()
        await running
        assert await kept == ints(8)
        assert batcher.admitted_inputs == 0
        batcher.close()

    asyncio.run(scenario())
    assert engine.batches == [1, 1]


def test_admission_refuses_a_call_that_does_not_fit_and_counts_what_it_refused():
    admission = Admission("m", limit=5)
    admission.admit(3)
    with pytest.raises(Overloaded) as refused:
        admission.admit(3)  # 3 admitted + 3 = 6 > 5
    assert refused.value.model == "m"
    assert refused.value.retry_after_s >= 1
    admission.release(3)
    admission.admit(5)  # room again
    assert admission.admitted == 5


def test_a_call_that_would_wait_past_max_wait_is_refused_though_the_queue_has_room():
    admission = Admission("m", limit=1000, max_wait_s=0.5)
    admission.admit(10)  # a lone call is always taken, before any run is measured
    admission.admit(50)  # no rate known yet: the count limit alone applies
    admission.served(100, 1.0)  # the engine clears 100 inputs a second while busy
    assert admission.expected_wait_s(1) == pytest.approx(0.61)
    with pytest.raises(Overloaded):
        admission.admit(1)  # 61 ahead at 100/s: 0.61 s > 0.5 s
    admission.release(20)
    admission.admit(1)  # 41 ahead: 0.41 s


def test_idle_time_does_not_lower_the_engines_measured_rate():
    """The drain rate decays when nothing drains; the service rate (while busy) does not, so
    the first burst after a quiet spell is not refused for a rate measured as zero."""
    admission = Admission("m", limit=1000, max_wait_s=0.5)
    admission.served(200, 1.0)
    admission.admit(10)
    assert admission.expected_wait_s(10) == pytest.approx(0.1)
