"""The gateway mounts the jobs API (``training.api``) behind its own API keys, with no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL

from models.store import ModelStore
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.gateway.routes.jobs import JobsSettings, build_jobs_service
from serving.rollout.route_table import RouteFollower
from training.api import JobsService
from training.spec import ClusterCapacity

LM = {"name": "tiny-lm", "trainer": "lm"}


async def never(*args: object) -> None:
    return None


def gateway(tmp_path: Path, jobs: JobsService | None) -> TestClient:
    config = parse_config(
        {
            "server": {"api_keys": ["user-key-0123456789"]},
            "models": [{"name": "enc", "source": "enc"}],
        }
    )
    core = GatewayCore(config, RouteFollower(never), ModelStore(tmp_path / "models"), jobs)
    return TestClient(build_http_app(core), base_url=LOOPBACK_URL)


@pytest.fixture
def service(tmp_path: Path) -> JobsService:
    # a fresh $LOOM_HOME: the store's folder does not exist yet
    settings = JobsSettings(db_url=f"sqlite:///{tmp_path / 'home' / 'loom.db'}")
    built = build_jobs_service(settings, max_body_bytes=1 << 20)
    # Ray's capacity needs a cluster; the unit tier has none
    return JobsService(
        store=built.store,
        capacity=lambda: ClusterCapacity(total_cpus=2, total_gpus=0),
        dataset_roots=built.dataset_roots,
    )


def test_the_jobs_routes_answer_behind_the_gateways_api_keys(
    tmp_path: Path, service: JobsService
) -> None:
    http = gateway(tmp_path, service)
    refused = http.post("/v1/jobs", json=LM)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "missing_api_key"  # the gateway's own shape

    created = http.post(
        "/v1/jobs", json=LM, headers={"Authorization": "Bearer user-key-0123456789"}
    )
    assert created.status_code == 201
    job_id = created.json()["id"]
    listed = http.get("/v1/jobs", headers={"Authorization": "Bearer user-key-0123456789"})
    assert [job["id"] for job in listed.json()["data"]] == [job_id]


def test_a_422_keeps_its_field_errors_through_the_gateway(
    tmp_path: Path, service: JobsService
) -> None:
    http = gateway(tmp_path, service)
    response = http.post(
        "/v1/jobs",
        json={**LM, "workers": 8},  # 8 workers x 1 CPU > the 2 CPUs given
        headers={"Authorization": "Bearer user-key-0123456789"},
    )
    assert response.status_code == 422
    assert [f["field"] for f in response.json()["error"]["fields"]] == ["resources.cpu"]


def test_without_a_jobs_service_the_gateway_has_no_jobs_routes(tmp_path: Path) -> None:
    http = gateway(tmp_path, None)
    response = http.get("/v1/jobs", headers={"Authorization": "Bearer user-key-0123456789"})
    assert response.status_code == 404
