"""Ray GCS fault tolerance (``ray.gcs_redis_address``): the GCS process SIGKILLed under load
fails no request, and ``loom serve`` starts it again.

The session's shared Ray cannot be used: this needs a head of its own started with Redis, so
``loom serve`` runs as a subprocess here (as in the e2e tier). Skipped without a Redis on
127.0.0.1:6379.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from serving.config import RedisAddress
from serving.gcs_fault_tolerance import (
    ProcessImage,
    find_gcs_server,
    redis_reachable,
    storage_namespace,
)
from serving.run_record import end_processes, session_processes

REPO = Path(__file__).resolve().parents[2]
REDIS = RedisAddress(host="127.0.0.1", port=6379)
CLIENTS = 4
BEFORE_KILL = 20
"""Requests answered before the kill: the load is under way."""
AFTER_RESTART = 50
"""Requests sent and answered after the restarted GCS listens, and after RECONNECT_S more."""
RECONNECT_S = 10
"""``gcs_rpc_server_reconnect_timeout_s`` of this head (Ray's default: 60): a driver, raylet
or worker that has not reached a GCS within it ends itself, so answers sent after the kill
plus this show the head reconnected to the new GCS, not merely lasted until the deadline."""


def wait_for(what: str, condition: Callable[[], object], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)


def redis_keys(pattern: str) -> list[str]:
    """``KEYS pattern`` over Redis' wire protocol (no client library needed)."""
    with socket.create_connection((REDIS.host, REDIS.port), timeout=5) as sock:
        arg = pattern.encode()
        sock.sendall(b"*2\r\n$4\r\nKEYS\r\n$%d\r\n%s\r\n" % (len(arg), arg))
        reader = sock.makefile("rb")
        count = int(reader.readline()[1:])
        keys = []
        for _ in range(count):
            size = int(reader.readline()[1:])
            keys.append(reader.read(size + 2)[:-2].decode())
        return keys


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def flag(image: ProcessImage, name: str) -> str:
    return next(a.split("=", 1)[1] for a in image.argv if a.startswith(f"--{name}="))


@dataclass
class Server:
    url: str
    home: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def record(self) -> dict[str, object]:
        return json.loads((self.home / "run" / f"serve-{self.port}.json").read_text())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def server_with_redis(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[Server]:
    """``loom serve`` with ``ray.gcs_redis_address`` set; stopped with Ctrl-C, and whatever
    of its process group or Ray session outlives that is ended."""
    if not redis_reachable(REDIS):
        pytest.skip(f"no Redis answers at {REDIS.url()}: GCS fault tolerance needs one")
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    config = {
        "models": [
            {"name": "minilm", "source": "minilm", "task": "embed", "replicas": 1,
             "num_cpus": 1, "torch_threads": 1},
        ],
        "training": {"enabled": False},
        "ray": {"gcs_redis_address": REDIS.url()},
    }  # fmt: skip
    (home / "loom.yaml").write_text(yaml.safe_dump(config))
    log = home / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "LOOM_API_KEYS"}
    env["LOOM_HOME"] = str(home)
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = str(RECONNECT_S)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "loom", "serve", "--port", str(port),
             "--config", str(home / "loom.yaml")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", home, port, process, log)
    session_dir: str | None = None
    try:

        def ready() -> bool:
            assert process.poll() is None, f"loom serve exited:\n{server.log_text()[-3000:]}"
            try:
                return httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("loom serve ready", ready, timeout_s=300)
        session_dir = str(server.record()["ray_session_dir"])
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # none should be left; none may be
        if session_dir is not None:
            end_processes(session_processes(session_dir))


@dataclass
class Load:
    """Closed-loop clients posting embeddings; every answer that is not a 200 is kept."""

    url: str
    answered: list[float] = field(default_factory=list)
    """When each 200's request was sent (monotonic)."""
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self) -> None:
        body = {"model": "minilm", "input": ["a GCS outage must not reach the client"]}
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post(f"{self.url}/v1/embeddings", json=body)
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))
                    continue
                if answer.status_code == 200:
                    self.answered.append(sent)
                else:
                    self.failed.append(f"{answer.status_code} {answer.text[:200]}")

    def answered_since(self, t: float) -> int:
        return sum(1 for sent in self.answered if sent >= t)


def test_a_gcs_killed_under_load_fails_no_request_and_is_started_again(
    server_with_redis: Server,
) -> None:
    server = server_with_redis
    session_dir = str(server.record()["ray_session_dir"])
    namespace = storage_namespace(server.home, server.port)
    assert redis_keys(f"RAY{namespace}@*"), "the GCS keeps no state in Redis"
    gcs = find_gcs_server(session_dir)
    assert gcs is not None
    bound = int(next(Path(session_dir).glob("gcs_server_port_*")).read_text())  # Ray's record

    load = Load(server.url)
    clients = [threading.Thread(target=load.client) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        wait_for("load under way", lambda: len(load.answered) >= BEFORE_KILL)
        killed_at = time.monotonic()
        os.kill(gcs.pid, signal.SIGKILL)

        def restarted() -> ProcessImage | None:
            image = find_gcs_server(session_dir)
            return image if image is not None and image.pid != gcs.pid else None

        wait_for("a new GCS process", restarted)
        new = restarted()
        assert new is not None
        assert int(flag(new, "gcs_server_port")) == bound  # where every raylet dials it
        host = flag(new, "node-ip-address")
        wait_for("the new GCS listening", lambda: accepts(host, bound))
        up_at = time.monotonic()
        wait_for("the restart logged", lambda: "GCS server restarted as pid" in server.log_text())
        wait_for("answers after the restart", lambda: load.answered_since(up_at) >= AFTER_RESTART)
        past_deadline = killed_at + RECONNECT_S + 2  # a head not reconnected is gone by then
        wait_for("answers past the deadline", lambda: load.answered_since(past_deadline) >= 10)
    finally:
        load.stop.set()
        for thread in clients:
            thread.join()
    total = len(load.answered) + len(load.failed)
    print(
        f"GCS down {up_at - killed_at:.2f} s (SIGKILL to its port listening again); "
        f"{len(load.failed)} of {total} requests failed, {load.answered_since(killed_at)} "
        f"answered after the kill"
    )
    assert load.failed == []  # 0 of total: the replicas and handles never needed the GCS

    server.process.send_signal(signal.SIGINT)  # a clean stop ends the restarted GCS too
    assert server.process.wait(timeout=60) == 0
    wait_for("the session's processes gone", lambda: not session_processes(session_dir), 30)
    assert redis_keys(f"RAY{namespace}@*") == []  # its GCS state removed from Redis
