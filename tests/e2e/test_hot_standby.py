"""Two `loom serve` processes against one job store and one Ray cluster (issue 14, point 3):
one holds the control plane and reconciles, the other stands by; SIGKILL the holder and the
standby takes over within the lease duration + retry period, no request fails that one retry
would not cover (the gateway and the replicas live in the cluster, not in `loom serve`), and
the new holder's reconciler rolls out a promotion.

The Ray cluster is started here with ``ray start --head`` (as an operator would, or KubeRay),
so it outlives either server; both join it through ``RAY_ADDRESS``."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from loom_process import LoomProcess, spawn_loom, start_loom, stop_loom
from ray_nodes import end_cluster, ray_temp_dir, start_ray_node, stop_ray_node
from waiting import wait_until

from models.bundled import bundled_model_dir
from models.settings import LoomEnv
from models.store import ModelStore
from serving.server import ray_serve_env
from training.db import create_db_engine
from training.leases import LeaseStore

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray on 127.0.0.1 only, the head and the drivers that join it (else Ray rewrites a local
address to the machine's)."""
CONTROL_PLANE = {"lease_duration_s": 6, "renew_deadline_s": 4, "retry_period_s": 1}
"""Short timings: the standby takes over at most 6 + 1 s after the holder's last renewal."""


@pytest.fixture
def ray_cluster(free_port: Callable[[], int]) -> Iterator[str]:
    """A one-node Ray cluster of its own on 127.0.0.1, stopped (its whole process group)
    after the test. Its temp folder is short: Ray's socket paths must fit in 107 bytes."""
    port = free_port()
    temp = ray_temp_dir()
    env = {**os.environ, **ray_serve_env(), **LOOPBACK}
    head = start_ray_node(
        "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=8",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", env=env,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_node(head)
        end_cluster(temp)


def holder_pid(home: Path) -> int | None:
    engine = create_db_engine(LoomEnv.from_environ({"LOOM_HOME": str(home)}).db_url)
    try:
        term = LeaseStore(engine).current("loom-control-plane")
    finally:
        engine.dispose()
    return None if term is None else int(term.holder.rpartition(":")[2])


class Traffic:
    """Embeddings in a loop on one connection pool; a request that fails on the transport
    is sent once more (what a client's retry covers); any other failure is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered = 0
        self.retried = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": "minilm", "input": "who serves this?"}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                for attempt in (1, 2):
                    try:
                        reply = client.post("/v1/embeddings", json=body)
                    except httpx.TransportError as exc:
                        if attempt == 2:
                            self.failed.append(repr(exc))
                        else:
                            self.retried += 1
                        continue
                    if reply.status_code == 200:
                        self.answered += 1
                    else:
                        self.failed.append(f"{reply.status_code}: {reply.text[:200]}")
                    break

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_the_standby_takes_over_from_a_killed_holder_and_no_request_fails(
    ray_cluster: str, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    home, port = tmp_path / "home", free_port()
    config = {
        "control_plane": CONTROL_PLANE,
        "training": {"enabled": False},
        "models": [{"name": "minilm", "source": "minilm", "task": "embed", "num_cpus": 0.5}],
    }
    # a new Ray cluster asks its drivers for the token it wrote to ~/.ray/auth_token; a
    # driver given an address sends it only in token mode
    joined = {"RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "token", **LOOPBACK}
    first: LoomProcess | None = None
    second: LoomProcess | None = None
    try:
        first = start_loom(home, port, config, env=joined)
        assert holder_pid(home) == first.process.pid  # the first one reconciles
        second = spawn_loom(home, port, config, env=joined)
        wait_until(lambda: "standing by" in second.log.read_text(), "the second standing by")
        assert holder_pid(home) == first.process.pid

        with Traffic(first.url) as traffic:
            wait_until(lambda: traffic.answered >= 20, "traffic flowing")
            first.process.send_signal(signal.SIGKILL)  # no release: the lease must lapse
            killed = time.monotonic()
            wait_until(lambda: holder_pid(home) == second.process.pid, "the standby taking over")
            takeover_s = time.monotonic() - killed
            answered_at_takeover = traffic.answered
            wait_until(
                lambda: traffic.answered >= answered_at_takeover + 20, "traffic after takeover"
            )
        assert traffic.failed == [], traffic.failed[:5]
        print(
            f"took over {takeover_s:.1f} s after the SIGKILL (lease 6 s + retry 1 s); "
            f"{traffic.answered} answered, {traffic.retried} retried once"
        )

        # the new holder reconciles: a promotion rolls out
        store = ModelStore(LoomEnv.from_environ({"LOOM_HOME": str(home)}).models_dir)
        version = store.register("minilm", bundled_model_dir(), task="embed").version
        promoted = httpx.post(
            f"{second.url}/v1/admin/models/minilm/promote", json={"version": version}, timeout=30
        )
        assert promoted.status_code == 200, promoted.text

        def served_version() -> str:
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "data": ["which version?"]}]}  # fmt: skip
            reply = httpx.post(f"{second.url}/v2/models/minilm/infer", json=body, timeout=60)
            return str(reply.json().get("model_version")) if reply.status_code == 200 else ""

        wait_until(lambda: served_version() == version, f"version {version} served")
    finally:
        if second is not None:
            stop_loom(second)
        if first is not None and first.process.poll() is None:
            stop_loom(first)
