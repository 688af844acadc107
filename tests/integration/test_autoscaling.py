"""Sidecar-driven autoscaling on a real Loom server (issue 14): the monitoring sidecar reports
every local replica and survives being killed without the replica noticing; closed-loop load
deepens the queue and Loom's policy (in Serve's controller) adds a replica, then, idle, goes
back to the minimum; the same with a real Prometheus between the sidecars and the policy.

Every wait is for what the server reports (``/v1/status``, the sidecar's series), under a
deadline generous enough for a busy machine; how fast it reacts is the benchmark's to
measure (``benchmarks.autoscaling``). The model is a tiny digits classifier whose replicas
hold their engine 40 ms a call (``faults``), so a replica clears ~25 calls/s and 12
concurrent callers queue ~12 deep: ceil(1 x 12 / 3) = 4 wanted, clamped to ``max_replicas``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from model_folders import make_digits_folder
from waiting import wait_until

from benchmarks.autoscaling import ClosedLoop, digits_body
from models.settings import LoomEnv
from models.store import ModelStore
from serving.config import parse_config
from serving.monitoring.scrape import scrape_sidecars, sidecar_urls, total
from serving.server import LoomServer

MODEL = "scaled"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_queue_depth": 3,
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
}
SLOW_ENGINE = {"delay_ms": 40, "delay_probability": 1.0, "delay_scope": "replica"}
MONITORING = {"stats_interval_s": 0.5, "poll_interval_s": 0.5, "rate_window_s": 2}
BODY = digits_body()
"""One request: a row of 64 pixels for the digits classifier."""


@dataclass
class Served:
    url: str
    loom: LoomServer


def start(
    tmp_path_factory: pytest.TempPathFactory,
    port: int,
    monitoring: dict[str, Any],
    *,
    autoscaling: dict[str, Any] = AUTOSCALING,
    server: dict[str, Any] | None = None,
) -> Served:
    home: Path = tmp_path_factory.mktemp("loom-autoscaling")
    env = LoomEnv.from_environ({"LOOM_HOME": str(home)})
    store = ModelStore(env.models_dir)
    store.register(MODEL, make_digits_folder(home / "digits"), task="classify")
    model = {
        "name": MODEL,
        "source": MODEL,
        "task": "classify",
        "num_cpus": 0.25,
        "torch_threads": 1,
        "autoscaling": autoscaling,
        "faults": SLOW_ENGINE,
        "limits": {"max_queue_wait_ms": None},
    }
    config = parse_config(
        {
            "training": {"enabled": False},
            "server": {"port": port, **(server or {})},
            "monitoring": MONITORING | monitoring,
            "models": [model],
        }
    )
    loom = LoomServer(config, env)
    try:
        loom.start(ready_timeout_s=300)
    except BaseException:
        loom.stop()
        raise
    return Served(f"http://127.0.0.1:{port}", loom)


def running_replicas(url: str) -> int:
    status = httpx.get(f"{url}/v1/status", timeout=30).json()
    return int(status["deployments"][f"model-{MODEL}"]["running_replicas"])


def load(url: str, callers: int) -> ClosedLoop:
    """Closed-loop load: ``callers`` concurrent requests, each sent again once answered."""
    return ClosedLoop(url, callers, f"/v2/models/{MODEL}/infer", BODY)


@pytest.fixture(scope="module")
def served(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]
) -> Iterator[Served]:
    """The policy reads the sidecars directly (no ``monitoring.prometheus_url``)."""
    running = start(tmp_path_factory, free_port(), {})
    try:
        yield running
    finally:
        running.loom.stop()


def test_the_sidecar_reports_every_replica_and_is_listed_as_a_scrape_target(served) -> None:
    httpx.post(f"{served.url}/v2/models/{MODEL}/infer", json=BODY, timeout=60)
    groups = httpx.get(f"{served.url}/v1/admin/targets", timeout=30).json()
    jobs = sorted(group["labels"]["job"] for group in groups)
    assert jobs[0] == "loom-gateway"
    assert set(jobs[1:]) == {"loom-sidecar"}  # one per node: this Ray has one
    replicas = running_replicas(served.url)

    def every_replica_reported() -> bool:
        text = scrape_sidecars(served.url)
        return total(text, "loom_sidecar_replicas") == replicas and (
            total(text, "loom_inputs_total", model=MODEL) >= 1
        )

    wait_until(every_replica_reported, f"the sidecar reports {replicas} replica(s)")


def test_a_killed_sidecar_leaves_the_replica_serving_and_comes_back(served) -> None:
    import ray

    from serving.monitoring.sidecar_actor import NAMESPACE, _named_sidecars

    [name] = _named_sidecars()
    pid = ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote())
    before = sidecar_urls(served.url)
    os.kill(pid, signal.SIGKILL)

    # the replica never notices: every request is answered while the sidecar is down
    for _ in range(20):
        reply = httpx.post(f"{served.url}/v2/models/{MODEL}/infer", json=BODY, timeout=60)
        assert reply.status_code == 200, reply.text

    def back() -> bool:
        try:
            text = scrape_sidecars(served.url)
        except httpx.HTTPError:
            return False
        return total(text, "loom_sidecar_replicas") >= 1 and (
            total(text, "loom_inputs_total", model=MODEL) >= 20
        )

    wait_until(back, "the sidecar restarted by Ray, reporting the replica again")
    restarted = ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote())
    assert restarted != pid
    assert len(sidecar_urls(served.url)) == len(before) == 1


def test_queue_depth_scales_up_under_load_and_back_to_the_minimum_when_idle(served) -> None:
    assert running_replicas(served.url) == 1
    with load(served.url, callers=12) as loop:
        up_s = wait_until(lambda: running_replicas(served.url) == 2, "a second replica")
        text = scrape_sidecars(served.url)
        assert total(text, "loom_autoscaler_desired_replicas", model=MODEL) == 2
        assert total(text, "loom_autoscaler_deciding_signal", signal="queue_depth") == 1
    assert set(loop.statuses) == {200}, loop.statuses  # scaling up failed no request
    down_s = wait_until(lambda: running_replicas(served.url) == 1, "back to one replica")
    print(f"scaled up in {up_s:.1f} s, down in {down_s:.1f} s after the load stopped")


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary (Debian: apt-get install prometheus)"
)
def test_prometheus_scrapes_the_sidecars_through_http_sd_and_its_data_scales_up(
    ray_session: None,
    tmp_path_factory: pytest.TempPathFactory,
    free_port: Callable[[], int],
    served: Served,
) -> None:
    served.loom.stop()  # one Loom server at a time on the session's Ray
    assert PROMETHEUS is not None
    gateway_port, prom_port = free_port(), free_port()
    data = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "loom",
                "http_sd_configs": [
                    {
                        "url": f"http://127.0.0.1:{gateway_port}/v1/admin/targets",
                        "refresh_interval": "2s",
                    }
                ],
                # the job label comes from the target group (loom-gateway, loom-sidecar)
                "relabel_configs": [
                    {"source_labels": ["job"], "target_label": "job"},
                ],
            }
        ],
    }
    (data / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={data / 'prometheus.yml'}",
            f"--storage.tsdb.path={data / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        via = start(tmp_path_factory, gateway_port, {"prometheus_url": prom_url})
        try:

            def scraped() -> bool:
                try:
                    answer = httpx.get(
                        f"{prom_url}/api/v1/query",
                        params={"query": f'loom_queue_depth{{model="{MODEL}"}}'},
                        timeout=10,
                    ).json()
                except httpx.HTTPError:
                    return False
                return bool(answer.get("data", {}).get("result"))

            wait_until(scraped, "Prometheus scraping the sidecar found through /v1/admin/targets")
            with load(via.url, callers=12) as loop:
                wait_until(lambda: running_replicas(via.url) == 2, "a second replica")
            assert set(loop.statuses) == {200}, loop.statuses
            depth = httpx.get(
                f"{prom_url}/api/v1/query",
                params={"query": "max_over_time(loom_autoscaler_signal"
                        f'{{model="{MODEL}",signal="queue_depth"}}[5m])'},
                timeout=10,
            ).json()["data"]["result"]  # fmt: skip
            # the decision Prometheus recorded was made on a queue above its target of 3
            assert float(depth[0]["value"][1]) > AUTOSCALING["target_queue_depth"]
        finally:
            via.loom.stop()
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


def test_scaled_to_zero_it_stays_ready_and_a_request_starts_a_replica(
    ray_session: None,
    tmp_path_factory: pytest.TempPathFactory,
    free_port: Callable[[], int],
    served: Served,
) -> None:
    """``min_replicas: 0``: idle, the model goes to zero replicas and the server stays ready;
    a request then waits for a replica up to its deadline (2 s here, shorter than a start)
    and is answered 503 (``model_starting``) with Retry-After, while the replica it asked for
    starts; the next request is served by it."""
    served.loom.stop()  # one Loom server at a time on the session's Ray
    to_zero = AUTOSCALING | {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 2}
    cold = start(
        tmp_path_factory,
        free_port(),
        {},
        autoscaling=to_zero,
        server={"request_timeout_s": 2},
    )
    try:

        def at_zero() -> bool:
            status = httpx.get(f"{cold.url}/v1/status", timeout=30).json()
            return bool(status["deployments"][f"model-{MODEL}"]["scaled_to_zero"])

        wait_until(at_zero, "scaled to zero when idle (its last replica gone)")
        ready = httpx.get(f"{cold.url}/v2/health/ready", timeout=30)
        status = httpx.get(f"{cold.url}/v1/status", timeout=30).json()
        assert ready.status_code == 200, status  # at zero on purpose: still ready
        first = httpx.post(f"{cold.url}/v2/models/{MODEL}/infer", json=BODY, timeout=60)
        assert first.status_code == 503, first.text
        assert "no replica running yet" in first.json()["error"]  # the v2 error shape: a string
        assert int(first.headers["retry-after"]) >= 1
        wait_until(lambda: running_replicas(cold.url) == 1, "the replica the request asked for")
        second = httpx.post(f"{cold.url}/v2/models/{MODEL}/infer", json=BODY, timeout=60)
        assert second.status_code == 200, second.text
    finally:
        cold.loom.stop()
