"""Start and stop ``loom serve`` as a real subprocess, as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from models.settings import LoomEnv
from serving.run_record import RunRecord, end_processes, session_processes

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
TEAM_A_KEY = "team-a-key-0123456789"
"""A named key with scopes infer and jobs (``server.keys`` in the keyed server's config)."""
TEAM_B_KEY = "team-b-key-0123456789"
"""A named key with the jobs scope only."""
ADMIN_KEY = "admin-key-0123456789"
"""A key with the admin scope (``server.admin_api_keys``): what lists the scrape targets."""
"""The key the keyed server takes from ``LOOM_API_KEYS`` (``keyed_server`` in conftest)."""


@dataclass
class LoomProcess:
    url: str
    home: Path
    process: subprocess.Popen
    log: Path
    stopped: tuple[int | None, bool] | None = None
    """What ``stop_loom`` found (exit code, leftovers), once it has run."""
    grpc_port: int | None = None
    """The v2 gRPC port (``server.grpc_port``) when the config sets one."""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def ray_session(self) -> str | None:
        """The Ray session this server started, from its run record (``serving.run_record``);
        None before the record is written, after a clean stop removed it, when the server
        joined a Ray it did not start, or when the record is another process's."""
        port = int(self.url.rsplit(":", 1)[1])
        path = LoomEnv.from_environ({"LOOM_HOME": str(self.home)}).run_dir / f"serve-{port}.json"
        try:
            record = RunRecord.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record.ray_session_dir if record.pid == self.process.pid else None


def start_loom(
    home: Path, port: int, config: dict | None = None, env: dict[str, str] | None = None
) -> LoomProcess:
    """``loom serve`` on ``port`` with ``config`` (written as ``home/loom.yaml``), once it
    answers ready; stopped, and an error raised, if it exits or is not ready in 300 s."""
    return _wait_ready(spawn_loom(home, port, config, env))


def spawn_loom(
    home: Path, port: int, config: dict | None = None, env: dict[str, str] | None = None
) -> LoomProcess:
    """``loom serve`` started, not waited for (a standby answers nothing of its own)."""
    home.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "loom", "serve", "--port", str(port)]
    if config is not None:
        path = home / "loom.yaml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config", str(path)]
    log = home / "serve.log"
    full_env = {k: v for k, v in os.environ.items() if k != "LOOM_API_KEYS"}
    full_env.update({"LOOM_HOME": str(home), **(env or {})})
    with log.open("wb") as out:
        process = subprocess.Popen(
            args,
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LoomProcess(f"http://127.0.0.1:{port}", home, process, log)


def _wait_ready(loom: LoomProcess, timeout_s: float = 300) -> LoomProcess:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if loom.process.poll() is not None:
            code = loom.process.returncode
            raise RuntimeError(f"loom serve exited with {code}:\n{loom.log_tail()}")
        try:
            if httpx.get(f"{loom.url}/v2/health/ready", timeout=2).status_code == 200:
                return loom
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_loom(loom)
    raise TimeoutError(f"loom serve was not ready in {timeout_s:.0f} s:\n{loom.log_tail()}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_loom(loom: LoomProcess) -> tuple[int | None, bool]:
    """Ctrl-C, as a user would. Returns the exit code and whether any process of the server
    outlived it by 15 s: of its process group (Ray's head processes), or of the Ray session it
    started (Ray's actor workers, the Serve replicas among them, each lead a process group of
    their own, so the group alone misses them). Those are then ended, so none is left.
    Stopping it again returns what the first stop found."""
    if loom.stopped is not None:
        return loom.stopped
    session = loom.ray_session()  # read first: a clean stop removes the record
    if loom.process.poll() is None:
        loom.process.send_signal(signal.SIGINT)
        try:
            loom.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            loom.process.kill()
            loom.process.wait(timeout=10)

    def left() -> bool:
        return _group_alive(loom.process.pid) or bool(session and session_processes(session))

    deadline = time.monotonic() + 15
    while left() and time.monotonic() < deadline:
        time.sleep(0.25)
    leftovers = left()
    if _group_alive(loom.process.pid):
        os.killpg(loom.process.pid, signal.SIGKILL)
    if session:
        end_processes(session_processes(session))  # SIGTERM, then SIGKILL after 5 s
    loom.stopped = (loom.process.returncode, leftovers)
    return loom.stopped


def run_loom(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    """One ``loom`` command to completion, with a clean environment and ``LOOM_HOME``."""
    return subprocess.run(
        [sys.executable, "-m", "loom", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={"PATH": "/usr/bin:/bin", "LOOM_HOME": str(home), **(env or {})},
    )
