"""A model autoscaled to zero (``min_replicas: 0``, issue 14): it counts as ready (a request
starts a replica), and a request that waits out its deadline for that replica is answered
503 with Retry-After, not 504. Serve's status is faked; the version's handle never answers,
as a handle queueing for a replica that is not there yet."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL, InProcessHandle

import serving.gateway.readiness as readiness
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.messages import InferCall
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute
from serving.rollout.serve_status import ServeApp, ServeDeployment

MODEL = "enc"


async def no_replica(call: InferCall) -> Any:
    await asyncio.sleep(3600)  # queued at the handle: no replica to take it


async def no_board(*args: object) -> None:
    return None


def gateway(monkeypatch: pytest.MonkeyPatch, deployment: ServeDeployment) -> TestClient:
    config = parse_config(
        {
            "server": {"request_timeout_s": 0.3},
            "models": [
                {"name": MODEL, "source": MODEL, "task": "embed",
                 "autoscaling": {"min_replicas": 0, "max_replicas": 2}},
            ],
        }
    )  # fmt: skip
    follower = RouteFollower(no_board)
    route = VersionRoute(MODEL, "1", 1.0, f"loom.{MODEL}@1", InProcessHandle(no_replica))
    follower.table = RouteTable(epoch=1, routes={MODEL: (route,)})
    apps = {f"loom.{MODEL}@1": ServeApp("RUNNING", "", {"model": deployment})}
    monkeypatch.setattr(readiness, "read_serve_apps", lambda: apps)  # Serve's status, faked
    return TestClient(
        build_http_app(GatewayCore(config, follower, store=None)), base_url=LOOPBACK_URL
    )


def test_a_model_at_zero_replicas_on_purpose_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    http = gateway(monkeypatch, ServeDeployment("HEALTHY", {}, ""))  # target 0, met
    assert http.get("/v2/health/ready").status_code == 200
    status = http.get("/v1/status").json()["deployments"][f"model-{MODEL}"]
    assert (status["ready"], status["scaled_to_zero"], status["running_replicas"]) == (
        True, True, 0,
    )  # fmt: skip


def test_a_request_that_waits_out_its_deadline_for_a_cold_start_is_503_with_retry_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    http = gateway(monkeypatch, ServeDeployment("HEALTHY", {}, ""))
    answer = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hi"]})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_starting"
    assert int(answer.headers["retry-after"]) >= 1


def test_a_replica_being_replaced_is_not_ready_and_its_waiting_request_is_503_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lost replica being replaced (unhealthy, one STARTING) is not zero on purpose: not
    ready. A request that waited for it past its deadline is 503 as well: no replica ran."""
    http = gateway(monkeypatch, ServeDeployment("UNHEALTHY", {"STARTING": 1}, ""))
    assert http.get("/v2/health/ready").status_code == 503
    answer = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hi"]})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_starting"


def test_a_running_replica_that_is_slow_past_the_deadline_is_still_504(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    http = gateway(monkeypatch, ServeDeployment("HEALTHY", {"RUNNING": 1}, ""))
    answer = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hi"]})
    assert answer.status_code == 504
