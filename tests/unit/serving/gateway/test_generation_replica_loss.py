"""A completion whose replica is lost (died, or refusing as it leaves after its engine loop
died): greedy or seeded it goes once more (it would answer the same), sampled it is a 503 (a
second run would answer differently); a stream whose replica is lost before its first chunk
starts again, since the client has heard nothing.
No Ray processes: the version app is a stand-in raising Ray's own error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL, Method
from prometheus_client import REGISTRY
from ray.exceptions import ActorDiedError

from models.engines.sampling import MIN_SAMPLING_TEMPERATURE
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.messages import (
    GREEDY_BELOW_TEMPERATURE,
    ChoiceDelta,
    GenerateCall,
    GenerateChunk,
    ReplicaUnavailable,
)
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute

MODEL = "gen-lost"


class Stream:
    """What ``handle.options(stream=True).generate.remote(call)`` gives: async chunks."""

    def __init__(self, chunks: AsyncIterator[GenerateChunk]) -> None:
        self._chunks = chunks
        self.cancelled = False

    async def __anext__(self) -> GenerateChunk:
        return await self._chunks.__anext__()

    def __aiter__(self) -> Stream:
        return self

    def cancel(self) -> None:
        self.cancelled = True


def died() -> Exception:
    return ActorDiedError()


def going() -> Exception:
    """A replica whose engine loop died: it refuses every call as it exits."""
    return ReplicaUnavailable(MODEL, "the engine's loop died")


class GenerationApp:
    """A generation version app whose first ``lose`` calls land on a replica that dies (or,
    with ``error=going``, refuses as it leaves)."""

    def __init__(self, lose: int, error: Callable[[], Exception] = died) -> None:
        self.lose = lose
        self.error = error
        self.calls = 0
        self.complete = Method(self._complete)
        self.generate = Method(self._generate)

    def options(self, **_: Any) -> GenerationApp:
        return self

    def _lost(self) -> bool:
        self.calls += 1
        return self.calls <= self.lose

    async def _complete(self, call: GenerateCall) -> GenerateChunk:
        if self._lost():
            raise self.error()
        return GenerateChunk("1", (ChoiceDelta(0, "hello", 1, "stop"),), (2,))

    def _generate(self, call: GenerateCall) -> Stream:
        lost = self._lost()

        async def chunks() -> AsyncIterator[GenerateChunk]:
            if lost:
                raise self.error()
            yield GenerateChunk("1", prompt_tokens=(2,))
            yield GenerateChunk("1", (ChoiceDelta(0, "hello", 1, "stop"),))

        return Stream(chunks())


def client(app: GenerationApp) -> TestClient:
    config = parse_config({"models": [{"name": MODEL, "source": MODEL, "task": "generate"}]})

    async def no_board(*args: object) -> None:
        return None

    follower = RouteFollower(no_board)
    follower.table = RouteTable(
        epoch=1, routes={MODEL: (VersionRoute(MODEL, "1", 1.0, f"{MODEL}-v1", app),)}
    )
    return TestClient(
        build_http_app(GatewayCore(config, follower, store=None)), base_url=LOOPBACK_URL
    )


def complete(http: TestClient, **params: Any) -> Any:
    return http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **params}
    )


LOSSES = pytest.mark.parametrize("error", [died, going], ids=["died", "going"])


def retries(reason: str) -> float:
    labels = {"model": MODEL, "reason": reason}
    return REGISTRY.get_sample_value("loom_retries_total", labels) or 0.0


@LOSSES
@pytest.mark.parametrize("params", [{"temperature": 0}, {"seed": 7}], ids=["greedy", "seeded"])
def test_a_repeatable_completion_goes_once_more(
    params: dict[str, Any], error: Callable[[], Exception]
) -> None:
    reason = "replica_lost" if error is died else "replica_unavailable"
    before = retries(reason)
    app = GenerationApp(lose=1, error=error)
    answer = complete(client(app), **params)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["text"] == "hello"
    assert app.calls == 2
    assert retries(reason) == before + 1


@LOSSES
def test_a_sampled_completion_is_not_run_twice_but_answered_503(
    error: Callable[[], Exception],
) -> None:
    app = GenerationApp(lose=1, error=error)
    answer = complete(client(app), temperature=0.8)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    code = "model_unavailable" if error is died else "replica_unavailable"
    assert answer.json()["error"]["code"] == code
    assert app.calls == 1


def test_lost_twice_is_a_503_with_retry_after() -> None:
    app = GenerationApp(lose=2, error=going)
    answer = complete(client(app), temperature=0)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "model_unavailable"
    assert app.calls == 2


@LOSSES
def test_a_stream_lost_before_its_first_chunk_starts_again(
    error: Callable[[], Exception],
) -> None:
    app = GenerationApp(lose=1, error=error)
    answer = complete(client(app), temperature=0.8, stream=True)
    assert answer.status_code == 200
    assert "hello" in answer.text
    assert answer.text.rstrip().endswith("data: [DONE]")
    assert app.calls == 2


def test_the_greedy_floor_is_the_engines() -> None:
    assert GREEDY_BELOW_TEMPERATURE == MIN_SAMPLING_TEMPERATURE
