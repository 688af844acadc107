from __future__ import annotations

import asyncio

import pytest

from serving.batcher import plan_batch
from serving.coalescer import Coalescer


@pytest.mark.parametrize(
    ("sizes", "max_inputs", "expected"),
    [([], 8, 0), ([3], 2, 1), ([1] * 40, 32, 32), ([5, 3, 1], 8, 2)],
)
def test_take_requests_fills_a_call_with_whole_requests(sizes, max_inputs, expected):
    assert plan_batch(sizes, max_inputs) == expected


def test_lone_request_is_sent_at_once_and_concurrent_ones_share_calls():
    calls: list[list[str]] = []
    release = asyncio.Event

    async def scenario() -> list[list[str]]:
        gate = release()

        async def call(inputs: list[str]) -> list[str]:
            calls.append(list(inputs))
            await gate.wait()
            return [s.upper() for s in inputs]

        coalescer = Coalescer(
            call=call, split=lambda r, a, b: r[a:b], max_batch_inputs=4, max_in_flight=1
        )
        tasks = [asyncio.create_task(coalescer.submit([f"r{i}"])) for i in range(7)]
        await asyncio.sleep(0.01)
        assert len(calls) == 1  # only one call out; six wait for it
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert results == [[f"R{i}"] for i in range(7)]
    # r0 alone, then r1..r4 (4 inputs), then r5..r6
    assert calls == [["r0"], ["r1", "r2", "r3", "r4"], ["r5", "r6"]]


def test_a_failed_call_fails_only_its_own_group():
    async def scenario() -> tuple[object, object]:
        async def call(inputs: list[str]) -> list[str]:
            if "bad" in inputs:
                raise RuntimeError("model down")
            return inputs

        coalescer = Coalescer(
            call=call, split=lambda r, a, b: r[a:b], max_batch_inputs=1, max_in_flight=1
        )
        bad = asyncio.create_task(coalescer.submit(["bad"]))
        good = asyncio.create_task(coalescer.submit(["good"]))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError)
    assert good == ["good"]
