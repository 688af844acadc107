"""The gateway's coalescer: whole requests per call, no timer, each caller its own rows; what
expired or was cancelled before sending is left out."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from fake_rows import Items, items

from serving.gateway.coalescer import Coalescer
from serving.messages import (
    DeadlineExceeded,
    Envelope,
    InferCall,
    InferReply,
    Overloaded,
    ReplicaUnavailable,
)
from serving.replicas.batcher import plan_batch


def envelope(i: int, deadline_s: float = float("inf")) -> Envelope:
    return Envelope(f"r{i}", deadline_s)


@pytest.mark.parametrize(
    ("sizes", "max_inputs", "expected"),
    [([], 8, 0), ([3], 2, 1), ([1] * 40, 32, 32), ([5, 3, 1], 8, 2)],
)
def test_take_requests_fills_a_call_with_whole_requests(sizes, max_inputs, expected):
    assert plan_batch(sizes, max_inputs) == expected


def upper(call: InferCall) -> InferReply[Items]:
    return InferReply(Items(tuple(s.upper() for s in call.inputs)))


def test_lone_request_is_sent_at_once_and_concurrent_ones_share_calls():
    calls: list[list[str]] = []

    async def scenario() -> list[Items]:
        gate = asyncio.Event()

        async def call(infer_call: InferCall) -> InferReply[Items]:
            calls.append(list(infer_call.inputs))
            await gate.wait()
            return upper(infer_call)

        coalescer = Coalescer(call=call, max_batch_inputs=4, max_in_flight=1, model="m")
        tasks = [asyncio.create_task(coalescer.submit(envelope(i), [f"r{i}"])) for i in range(7)]
        await asyncio.sleep(0.01)
        assert len(calls) == 1  # only one call out; six wait for it
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert results == [items(f"R{i}") for i in range(7)]
    # r0 alone, then r1..r4 (4 inputs), then r5..r6
    assert calls == [["r0"], ["r1", "r2", "r3", "r4"], ["r5", "r6"]]


def test_a_failed_call_fails_only_its_own_group():
    async def scenario() -> tuple[object, object]:
        async def call(infer_call: InferCall) -> InferReply[Items]:
            if "bad" in infer_call.inputs:
                raise RuntimeError("model down")
            return upper(infer_call)

        coalescer = Coalescer(call=call, max_batch_inputs=1, max_in_flight=1, model="m")
        bad = asyncio.create_task(coalescer.submit(envelope(0), ["bad"]))
        good = asyncio.create_task(coalescer.submit(envelope(1), ["good"]))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError)
    assert good == items("GOOD")


def test_a_call_awaiting_a_reply_nothing_else_holds_survives_garbage_collection():
    """The loop holds tasks weakly; a collected send once handed its caller a GeneratorExit
    (CI, the gateway's 504 test, whose stand-in replica waits on an unreferenced Event)."""

    async def scenario() -> BaseException | None:
        async def hang(infer_call: InferCall) -> InferReply[Items]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        coalescer = Coalescer(call=hang, max_batch_inputs=4, max_in_flight=1, model="m")
        waiter = asyncio.create_task(coalescer.submit(envelope(0), ["x"]))
        await asyncio.sleep(0)  # the send starts and parks on its Event
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        assert not waiter.done()
        waiter.cancel()
        try:
            await waiter
        except BaseException as exc:
            return exc
        return None

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)


def test_a_send_stopped_from_outside_is_a_retryable_503_to_its_callers():
    async def scenario() -> BaseException | None:
        started = asyncio.Event()

        async def hang(infer_call: InferCall) -> InferReply[Items]:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        coalescer = Coalescer(call=hang, max_batch_inputs=4, max_in_flight=1, model="m")
        waiter = asyncio.create_task(coalescer.submit(envelope(0), ["x"]))
        await started.wait()
        for send in list(coalescer._sends):
            send.cancel()
        try:
            await waiter
        except BaseException as exc:
            return exc
        return None

    assert isinstance(asyncio.run(scenario()), ReplicaUnavailable)


def test_waiters_cancelled_or_expired_while_queued_are_left_out_of_the_next_call():
    calls: list[list[str]] = []

    async def scenario() -> tuple[object, object, object]:
        gate = asyncio.Event()

        async def call(infer_call: InferCall) -> InferReply[Items]:
            calls.append(list(infer_call.inputs))
            await gate.wait()
            return upper(infer_call)

        coalescer = Coalescer(call=call, max_batch_inputs=8, max_in_flight=1, model="m")
        first = asyncio.create_task(coalescer.submit(envelope(0), ["a"]))
        await asyncio.sleep(0)  # "a" is out; the rest queue behind it
        gone = asyncio.create_task(coalescer.submit(envelope(1), ["b"]))
        late = asyncio.create_task(coalescer.submit(envelope(2, time.time() + 0.02), ["c"]))
        kept = asyncio.create_task(coalescer.submit(envelope(3), ["d"]))
        await asyncio.sleep(0)
        gone.cancel()  # the gateway gave up on it
        await asyncio.sleep(0.03)  # "c"'s deadline passes while it queues
        gate.set()
        return await asyncio.gather(first, late, kept, return_exceptions=True)

    first, late, kept = asyncio.run(scenario())
    assert (first, kept) == (items("A"), items("D"))
    assert isinstance(late, DeadlineExceeded)
    assert calls == [["a"], ["d"]]  # b (cancelled) and c (expired) never crossed the hop


def test_a_part_the_replica_skipped_answers_its_caller_with_deadline_exceeded():
    async def scenario() -> list[object]:
        gate = asyncio.Event()

        async def call(infer_call: InferCall) -> InferReply[Items]:
            if len(infer_call.parts) == 1:  # the first call, alone: holds the line
                await gate.wait()
                return upper(infer_call)
            # the joined call: the replica skipped part 0 (its deadline passed in the queue)
            return InferReply(Items(("R2",)), skipped=frozenset({0}))

        coalescer = Coalescer(call=call, max_batch_inputs=8, max_in_flight=1, model="m")
        tasks = [asyncio.create_task(coalescer.submit(envelope(0), ["r0"]))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(coalescer.submit(envelope(i), [f"r{i}"])) for i in (1, 2)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, skipped, computed = asyncio.run(scenario())
    assert first == items("R0")
    assert isinstance(skipped, DeadlineExceeded)
    assert computed == items("R2")


def test_past_its_bound_the_queue_refuses_at_once_with_retry_after():
    """The replicas behind a full coalescer are full: a newcomer hears 503 now, not later."""

    async def scenario() -> None:
        gate = asyncio.Event()

        async def call(infer_call: InferCall) -> InferReply[Items]:
            await gate.wait()
            return upper(infer_call)

        coalescer = Coalescer(
            call=call, max_batch_inputs=4, max_in_flight=1, max_waiting_inputs=3, model="m"
        )
        sent = asyncio.create_task(coalescer.submit(envelope(0), ["a"]))  # goes at once
        queued = [asyncio.create_task(coalescer.submit(envelope(i), ["b"])) for i in (1, 2, 3)]
        while coalescer.waiting_inputs < 3:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await coalescer.submit(envelope(4), ["c"])
        assert refused.value.retry_after_s == 1
        gate.set()
        assert await sent == items("A")
        assert await asyncio.gather(*queued) == [items("B")] * 3

    asyncio.run(scenario())


def test_a_request_that_waited_past_the_budget_is_shed_not_sent():
    """With ``max_wait_s``, what queued longer than that while the replicas were busy is
    answered 503 when the next call goes, and only what is still in time is in that call."""

    async def scenario() -> None:
        gate = asyncio.Event()
        calls: list[list[str]] = []
        shed: list[int] = []
        now = [0.0]  # the coalescer's clock, moved by the test

        async def call(infer_call: InferCall) -> InferReply[Items]:
            calls.append(list(infer_call.inputs))
            await gate.wait()
            return upper(infer_call)

        coalescer = Coalescer(
            call=call,
            max_batch_inputs=4,
            max_in_flight=1,
            max_wait_s=0.05,
            on_shed=shed.append,
            clock=lambda: now[0],
            model="m",
        )
        sent = asyncio.create_task(coalescer.submit(envelope(0), ["a"]))  # goes at once
        stale = [asyncio.create_task(coalescer.submit(envelope(i), ["b", "c"])) for i in (1, 2)]
        while coalescer.waiting_inputs < 4:
            await asyncio.sleep(0)
        now[0] = 0.04
        fresh = asyncio.create_task(coalescer.submit(envelope(3), ["d"]))
        while coalescer.waiting_inputs < 5:
            await asyncio.sleep(0)
        now[0] = 0.06  # the first two have waited 60 ms, the last 20 ms
        gate.set()
        assert await sent == items("A")
        for task in stale:
            with pytest.raises(Overloaded) as refused:
                await task
            assert refused.value.retry_after_s == 1
        assert await fresh == items("D")
        assert calls == [["a"], ["d"]]
        assert shed == [2, 2]

    asyncio.run(scenario())
