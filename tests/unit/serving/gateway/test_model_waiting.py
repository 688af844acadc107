"""A model waiting for its source (no version in the store yet) at the gateway, without Ray:
its routes answer 503 ``model_not_ready`` naming what is missing, in each protocol's shape,
its v2 readiness is 503, and the server's readiness is not held back by it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL, InProcessHandle

import serving.gateway.readiness as readiness
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.messages import EmbedReply, InferCall, InferReply
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute
from serving.rollout.serve_status import ServeApp, ServeDeployment

READY, LATER = "enc-ready", "enc-later"
REASON = "alias 'serving' of enc-later is not set in the model store yet"


async def embed(call: InferCall) -> Any:
    rows = len(call.inputs)
    vectors = np.tile(np.array([1.0, 0.0], dtype=np.float32), (rows, 1))
    return InferReply(EmbedReply(vectors, token_counts=(1,) * rows, version="1"))


async def no_board(*args: object) -> None:
    return None


@pytest.fixture
def http(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """``enc-ready`` routed to an in-process version app that Serve reports RUNNING;
    ``enc-later`` waiting for its alias."""
    config = parse_config(
        {
            "models": [
                {"name": READY, "source": READY, "task": "embed"},
                {"name": LATER, "source": f"{LATER}#serving", "task": "embed"},
            ]
        }
    )
    follower = RouteFollower(no_board)
    route = VersionRoute(READY, "1", 1.0, f"loom.{READY}@1", InProcessHandle(embed))
    follower.table = RouteTable(epoch=1, routes={READY: (route,)}, waiting={LATER: REASON})
    running = ServeDeployment("HEALTHY", {"RUNNING": 1}, "")
    apps = {f"loom.{READY}@1": ServeApp("RUNNING", "", {"model": running})}
    monkeypatch.setattr(readiness, "read_serve_apps", lambda: apps)  # Serve's status, faked
    return TestClient(
        build_http_app(GatewayCore(config, follower, store=None)), base_url=LOOPBACK_URL
    )


def test_a_waiting_models_requests_are_503_naming_the_missing_alias_in_each_shape(
    http: TestClient,
) -> None:
    openai = http.post("/v1/embeddings", json={"model": LATER, "input": ["hi"]})
    v2 = http.post(
        f"/v2/models/{LATER}/infer",
        json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]},
    )

    assert openai.status_code == v2.status_code == 503
    assert openai.headers["retry-after"] == v2.headers["retry-after"] == "1"
    error = openai.json()["error"]
    assert error["code"] == "model_not_ready"
    assert error["message"] == f"model '{LATER}' has no version ready yet: {REASON}"
    assert v2.json() == {"error": f"model '{LATER}' has no version ready yet: {REASON}"}


def test_the_other_model_serves_meanwhile(http: TestClient) -> None:
    answer = http.post("/v1/embeddings", json={"model": READY, "input": ["hi"]})
    assert answer.status_code == 200
    assert answer.json()["data"][0]["embedding"] == [1.0, 0.0]


def test_the_waiting_model_is_not_ready_and_the_server_is(http: TestClient) -> None:
    assert http.get(f"/v2/models/{LATER}/ready").status_code == 503
    assert http.get(f"/v2/models/{READY}/ready").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200

    status = http.get("/v1/status").json()["deployments"]
    assert status[f"model-{LATER}"]["status"] == "WAITING"
    assert status[f"model-{LATER}"]["waiting_for"] == REASON
    assert status[f"model-{LATER}"]["ready"] is False


def test_a_model_starting_without_a_reason_still_holds_back_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a source that does not resolve is excused: a version still loading is not."""
    config = parse_config({"models": [{"name": READY, "source": READY, "task": "embed"}]})
    follower = RouteFollower(no_board)  # no route, no reason: it is deploying
    monkeypatch.setattr(readiness, "read_serve_apps", dict)
    http = TestClient(
        build_http_app(GatewayCore(config, follower, store=None)), base_url=LOOPBACK_URL
    )

    assert http.get("/v2/health/ready").status_code == 503
    answer = http.post("/v1/embeddings", json={"model": READY, "input": ["hi"]})
    assert answer.json()["error"]["message"] == f"model '{READY}' has no version ready yet"
