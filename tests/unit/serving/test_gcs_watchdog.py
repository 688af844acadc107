"""The GCS watchdog and its pure parts, with stand-in processes (no Ray)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serving.config import RedisAddress
from serving.gcs_fault_tolerance import (
    GcsWatchdog,
    ProcessImage,
    find_gcs_server,
    head_env,
    next_restart_delay_s,
    redis_reachable,
    restart_argv,
    storage_namespace,
)
from serving.run_record import process_start_ticks

SLEEPER = "import time; time.sleep(600)"


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


def past_exec(pid: int) -> bool:
    """Started, and its command line readable: read while the kernel is still in exec,
    ``/proc/<pid>/cmdline`` can be empty, and an image of no argv cannot be started again."""
    return process_start_ticks(pid) is not None and bool(ProcessImage.of(pid).argv)


@pytest.fixture
def sleeper() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(list(argv), env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_namespace_is_one_per_home_and_port_and_stable(tmp_path: Path) -> None:
    a = storage_namespace(tmp_path / "a", 8000)
    assert a == storage_namespace(tmp_path / "a", 8000)
    assert (
        len({a, storage_namespace(tmp_path / "b", 8000), storage_namespace(tmp_path / "a", 8001)})
        == 3
    )
    assert a.startswith("loom-")
    assert "@" not in a  # Ray's key separator


def test_head_env_names_what_ray_reads() -> None:
    env = head_env(RedisAddress(host="127.0.0.1", port=6379), "loom-x")
    assert env == {
        "RAY_REDIS_ADDRESS": "redis://127.0.0.1:6379",
        "RAY_external_storage_namespace": "loom-x",
    }


def test_restart_pins_the_port_the_gcs_had_bound() -> None:
    argv = ("/x/gcs_server", "--gcs_server_port=0", "--metrics-agent-port=0")
    assert restart_argv(argv, 40123) == [
        "/x/gcs_server",
        "--gcs_server_port=40123",
        "--metrics-agent-port=0",
    ]


def test_restart_delay_doubles_only_while_the_gcs_keeps_dying_at_once() -> None:
    delays = [0.0]
    for _ in range(6):  # each restarted GCS died after 1 s
        delays.append(next_restart_delay_s(1.0, delays[-1]))
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert next_restart_delay_s(None, 0.0) == 0.0  # the first death: at once
    assert next_restart_delay_s(30.0, 8.0) == 0.0  # it ran 30 s: at once again


def test_redis_reachable_means_it_answers_ping() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                assert conn.recv(64) == b"PING\r\n"
                conn.sendall(b"+PONG\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        assert redis_reachable(RedisAddress(host="127.0.0.1", port=port))
        thread.join()
    # the socket closed: the port refuses
    assert not redis_reachable(RedisAddress(host="127.0.0.1", port=port), timeout_s=1)


def test_the_gcs_of_a_session_is_found_by_its_executable_name(
    tmp_path: Path, sleeper: Callable[..., subprocess.Popen[bytes]]
) -> None:
    session = tmp_path / "session_2026-12-05_00-00-00_000000_1"
    session.mkdir()
    gcs = tmp_path / "gcs_server"
    gcs.symlink_to(sys.executable)
    other = sleeper(sys.executable, "-c", SLEEPER, f"--log_dir={session}/logs")
    found = sleeper(str(gcs), "-c", SLEEPER, f"--log_dir={session}/logs")
    wait_until(lambda: process_start_ticks(found.pid) is not None)
    image = find_gcs_server(str(session))
    assert image is not None
    assert image.pid == found.pid != other.pid
    assert find_gcs_server(str(tmp_path / "session_none")) is None


def test_a_dead_gcs_is_started_again_as_it_was_and_closed_with_the_watchdog(
    sleeper: Callable[..., subprocess.Popen[bytes]],
) -> None:
    env = {**os.environ, "RAY_external_storage_namespace": "loom-test"}
    first = sleeper(sys.executable, "-c", SLEEPER, "--gcs_server_port=0", env=env)
    wait_until(lambda: past_exec(first.pid))
    watchdog = GcsWatchdog(ProcessImage.of(first.pid), port=40123, poll_interval_s=0.01)
    watchdog.start()
    try:
        first.send_signal(signal.SIGKILL)
        wait_until(lambda: watchdog.restarts == 1)
        restarted = ProcessImage.of(watchdog.pid)
        assert restarted.pid != first.pid
        assert restarted.argv == (sys.executable, "-c", SLEEPER, "--gcs_server_port=40123")
        assert restarted.env["RAY_external_storage_namespace"] == "loom-test"
    finally:
        watchdog.close()
    assert process_start_ticks(restarted.pid) is None  # ended, and reaped


def test_a_stopped_watchdog_restarts_nothing(
    sleeper: Callable[..., subprocess.Popen[bytes]],
) -> None:
    first = sleeper(sys.executable, "-c", SLEEPER)
    wait_until(lambda: past_exec(first.pid))
    watchdog = GcsWatchdog(ProcessImage.of(first.pid), port=1, poll_interval_s=0.01)
    watchdog.start()
    watchdog.stop()  # as before ray.shutdown, which ends the GCS
    first.kill()
    first.wait()
    time.sleep(0.3)  # 30 polls of a watchdog that must not act
    watchdog.close()
    assert watchdog.restarts == 0
