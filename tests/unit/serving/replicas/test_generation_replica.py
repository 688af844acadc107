"""The generation replica without Ray, on a tiny GPT-2: a call's deadline bounds its wait
for a first token (its sequences are cancelled and its slot freed), and a call that arrives
past its deadline never reaches the engine. A stalled engine stands in for a full batch."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tiny_replicas import tiny_generation_replica

from models.engines.generate import GenerationEngine, SamplingParams, SequenceUpdate
from serving.messages import DeadlineExceeded, Envelope, GenerateCall, Overloaded
from serving.replicas.generation import GenerationReplica

MODEL = "tiny-gen-deadline"


class StalledEngine:
    """The replica's engine with a full batch that outlasts every deadline: it takes
    sequences and runs none of them; a cancelled one is let go."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self.waiting: dict[str, Callable[[SequenceUpdate], None]] = {}
        self.cancelled: list[str] = []
        self._lock = threading.Lock()

    def submit(
        self, prompt: Any, params: SamplingParams, *, on_update: Callable[[SequenceUpdate], None]
    ) -> str:
        with self._lock:
            seq_id = f"waiting-{len(self.waiting) + len(self.cancelled) + 1}"
            self.waiting[seq_id] = on_update
        return seq_id

    def cancel(self, seq_id: str) -> None:
        with self._lock:
            self.cancelled.append(seq_id)
            self.waiting.pop(seq_id, None)

    def __getattr__(self, name: str) -> Any:  # context length, tokenizer, stats...
        return getattr(self.engine, name)


@contextlib.contextmanager
def stalled(replica: GenerationReplica) -> Iterator[StalledEngine]:
    """The replica's engine stalled for the block; its real engine back afterwards."""
    real = replica._engine
    engine = StalledEngine(real)
    replica._engine = engine  # type: ignore[assignment]
    try:
        yield engine
    finally:
        replica._engine = real


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> GenerationReplica:
    return tiny_generation_replica(
        tmp_path_factory.mktemp("gen"),
        MODEL,
        generation={"max_sequences": 1},
        limits={"max_queued": 1},  # one sequence admitted at a time
    )


def expired_count(replica: GenerationReplica) -> float:
    return replica.stats.counted(MODEL, "expired")


def call(request_id: str, deadline_s: float = float("inf")) -> GenerateCall:
    return GenerateCall(
        envelope=Envelope(request_id, deadline_s), prompts=("def main",), max_tokens=4
    )


def test_no_first_token_by_the_deadline_cancels_the_sequence_and_frees_its_slot(
    replica: GenerationReplica,
) -> None:
    before = expired_count(replica)

    async def scenario() -> None:
        stream = replica.generate(call("slow", time.time() + 0.05))
        accepted = await anext(stream)  # admitted: the prompt sizes come first
        assert accepted.prompt_tokens
        # the one slot is taken: another call is refused until the first lets go
        with pytest.raises(Overloaded):
            await anext(replica.generate(call("refused")))
        with pytest.raises(DeadlineExceeded) as late:
            await anext(stream)  # no token came: the engine was still busy
        assert late.value.request_id == "slow"

    with stalled(replica) as engine:
        asyncio.run(scenario())
    assert engine.cancelled == ["waiting-1"]  # given back before it ever ran
    assert engine.waiting == {}
    assert expired_count(replica) - before == 1

    # the slot is free again: the next call is admitted and answered in full
    reply = asyncio.run(replica.complete(call("next")))
    assert reply.deltas[0].finish_reason is not None


def test_a_call_that_arrives_past_its_deadline_never_reaches_the_engine(
    replica: GenerationReplica,
) -> None:
    before = expired_count(replica)
    with stalled(replica) as engine, pytest.raises(DeadlineExceeded):
        asyncio.run(replica.complete(call("stale", deadline_s=0.0)))
    assert engine.waiting == {}
    assert engine.cancelled == []  # nothing was submitted at all
    assert expired_count(replica) - before == 1
    assert asyncio.run(replica.complete(call("fresh"))).deltas  # and nothing held back
