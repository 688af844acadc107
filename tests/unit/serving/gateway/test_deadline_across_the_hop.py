"""The request's deadline crosses the gateway -> replica hop: a request the gateway has
answered 504 for is not computed by the replica. No Ray: the gateway's core calls a real
replica in-process through a stand-in for its Serve handle, on one event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from inprocess import InProcessHandle, gateway_over
from model_folders import make_digits_folder

from models.store import ModelStore
from serving.config import parse_config
from serving.gateway.core import GatewayCore
from serving.messages import (
    ClassifyReply,
    DeadlineExceeded,
    Envelope,
    InferenceRequest,
)
from serving.replicas.inference import InferenceReplica

MODEL = "digits-hop"


@pytest.fixture
def replica(tmp_path: Path) -> InferenceReplica:
    store = ModelStore(tmp_path / "store")
    store.register(MODEL, make_digits_folder(tmp_path / "digits"), task="classify")
    config = {
        "name": MODEL,
        "source": MODEL,
        "task": "classify",
        "device": "cpu",
        "batching": {"max_batch_size": 8, "max_wait_ms": 0},
    }
    return InferenceReplica(config, str(store.root))


def gateway(replica: InferenceReplica) -> tuple[GatewayCore, InProcessHandle]:
    config = parse_config({"models": [{"name": MODEL, "source": MODEL, "task": "classify"}]})
    handle = InProcessHandle(replica.infer, replica.info)
    return gateway_over(config, MODEL, handle), handle


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition`` holds (what the code reports, not a time)."""
    while not condition():
        await asyncio.sleep(0)


def test_a_request_the_gateway_gave_up_on_is_skipped_by_the_replica(
    replica: InferenceReplica,
) -> None:
    core, handle = gateway(replica)
    loaded = replica._only
    assert loaded is not None
    engine_free = threading.Event()
    rows = np.zeros((1, 64), dtype=np.float32)
    inputs_before = replica.stats.counted(MODEL, "inputs")
    expired_before = replica.stats.counted(MODEL, "expired")

    async def scenario() -> None:
        # hold the replica's engine thread: the first request's batch waits on it
        assert loaded.model.runner is not None
        loaded.model.runner.submit(engine_free.wait)
        first = asyncio.create_task(
            core.infer(InferenceRequest(MODEL, tuple(rows), Envelope("held")))
        )
        batcher = loaded.batcher
        await until(lambda: batcher.admitted_inputs == 1 and batcher.queued_inputs == 0)
        # the second queues in the replica's batcher behind the running batch
        late = InferenceRequest(MODEL, tuple(rows), Envelope("late", time.time() + 0.05))
        with pytest.raises(DeadlineExceeded) as gave_up:  # the gateway answers 504
            await core.infer(late)
        assert gave_up.value.request_id == "late"
        engine_free.set()
        reply = await first
        assert isinstance(reply, ClassifyReply)
        assert reply.probabilities.shape == (1, 10)
        await until(lambda: len(handle.replies) == 2)

    try:
        asyncio.run(scenario())
    finally:
        engine_free.set()

    held, late = handle.replies
    assert (held.skipped, late.skipped) == (frozenset(), frozenset({0}))
    assert late.rows is None  # nothing computed for the request nobody waits for
    assert replica.stats.counted(MODEL, "inputs") - inputs_before == 1  # the held one's row
    assert replica.stats.counted(MODEL, "expired") - expired_before == 1


def test_a_request_whose_deadline_passed_in_the_gateways_queue_never_crosses_the_hop(
    replica: InferenceReplica,
) -> None:
    """The coalescer leaves it out of the next call: the replica never hears of it."""
    core, handle = gateway(replica)
    rows = tuple(np.zeros((1, 64), dtype=np.float32))

    async def scenario() -> None:
        gone = InferenceRequest(MODEL, rows, Envelope("gone", deadline_s=0.0))
        with pytest.raises(DeadlineExceeded):
            await core.infer(gone)
        reply = await core.infer(InferenceRequest(MODEL, rows, Envelope("live")))
        assert isinstance(reply, ClassifyReply)

    asyncio.run(scenario())
    assert [len(r.skipped) for r in handle.replies] == [0]  # one call: the live request's
