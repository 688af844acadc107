"""A call whose replica is lost goes once more (Serve's router has taken the dead replica
out), within the request's deadline; lost twice, the client gets 503 with Retry-After, never
a bare 500. No Ray processes: the lost replica is a stand-in that raises Ray's own error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL, InProcessHandle, gateway_over
from model_folders import make_digits_folder
from prometheus_client import REGISTRY
from ray.exceptions import ActorDiedError

from models.store import ModelStore
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.messages import InferCall, InferReply
from serving.replicas.inference import InferenceReplica

MODEL = "digits-lost"
ROW = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> InferenceReplica:
    root = tmp_path_factory.mktemp("lost")
    store = ModelStore(root / "store")
    store.register(MODEL, make_digits_folder(root / "digits"), task="classify")
    config = {"name": MODEL, "source": MODEL, "task": "classify", "device": "cpu"}
    return InferenceReplica(config, str(store.root))


class Replicas:
    """Two replicas behind one handle: the first ``lose`` calls land on one that dies."""

    def __init__(self, replica: InferenceReplica, lose: int) -> None:
        self.replica = replica
        self.lose = lose
        self.calls = 0

    async def infer(self, call: InferCall) -> InferReply[Any]:
        self.calls += 1
        if self.calls <= self.lose:
            raise ActorDiedError()
        return await self.replica.infer(call)


@pytest.fixture
def retries() -> Iterator[Any]:
    def count() -> float:
        labels = {"model": MODEL, "reason": "replica_lost"}
        return REGISTRY.get_sample_value("loom_retries_total", labels) or 0.0

    before = count()
    return lambda: count() - before


def client(replicas: Replicas) -> TestClient:
    config = parse_config({"models": [{"name": MODEL, "source": MODEL, "task": "classify"}]})
    handle = InProcessHandle(replicas.infer, replicas.replica.info)
    return TestClient(build_http_app(gateway_over(config, MODEL, handle)), base_url=LOOPBACK_URL)


def test_a_call_whose_replica_died_is_answered_by_another(replica, retries) -> None:
    replicas = Replicas(replica, lose=1)
    answer = client(replicas).post(f"/v2/models/{MODEL}/infer", json={"inputs": [ROW]})

    assert answer.status_code == 200
    assert np.asarray(answer.json()["outputs"][0]["data"]).size == 10
    assert replicas.calls == 2
    assert retries() == 1


def test_lost_twice_is_503_with_retry_after_in_shape_and_logged(replica, retries, caplog):
    replicas = Replicas(replica, lose=2)
    http = client(replicas)
    answer = http.post(
        f"/v2/models/{MODEL}/infer", json={"inputs": [ROW]}, headers={"x-request-id": "lost-9"}
    )

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert "unavailable" in answer.json()["error"]
    assert replicas.calls == 2  # once more, not forever
    assert retries() == 1
    assert any("lost-9" in r.getMessage() for r in caplog.records)


def test_the_embeddings_route_retries_too() -> None:
    """Every embed/classify route goes through the same call: OpenAI's shape for the 503."""

    async def always_lost(call: InferCall) -> InferReply[Any]:
        raise ActorDiedError()

    config = parse_config({"models": [{"name": "enc-lost", "source": "enc", "task": "embed"}]})
    http = TestClient(
        build_http_app(gateway_over(config, "enc-lost", InProcessHandle(always_lost))),
        base_url=LOOPBACK_URL,
    )
    answer = http.post("/v1/embeddings", json={"model": "enc-lost", "input": "hi"})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_unavailable"
