"""Servers under test as subprocesses: a free port, start in a new process group, wait until
ready, stop with SIGINT and reap whatever the server left behind.

Every server is started the same way, so the stack, the plain server and the no-op server
differ only in what runs inside them.

    port = free_port()
    spec = ServerSpec(name="plain", port=port, log_dir=tmp, env=child_env({}),
                      argv=(sys.executable, "-m", "benchmarks.plain_server", "--port", str(port)))
    with ServerProcess(spec) as server:   # started and ready, or ServerNotReady
        ...                              # drive load
    print(server.stop_record)            # exit code, whether it had to be killed
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

LOCALHOST = "127.0.0.1"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Opener that never goes through an ``http_proxy``: readiness is asked of 127.0.0.1 only."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_env(
    overrides: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
    drop_prefixes: tuple[str, ...] = ("LOOM_",),
) -> dict[str, str]:
    """This process's environment minus ``drop_prefixes`` variables, plus ``overrides``.

    Inherited ``LOOM_*`` settings (API keys, a config path) would change what is measured,
    so a server under test sees only the ones the benchmark sets.
    """
    environ = os.environ if environ is None else environ
    kept = {k: v for k, v in environ.items() if not k.startswith(drop_prefixes)}
    return {**kept, **overrides}


@dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """How to start one server under test and how to tell it is ready."""

    name: str
    """Short name used for log files and messages (``stack``, ``plain``, ``noop``)."""
    argv: tuple[str, ...]
    port: int
    """The 127.0.0.1 port the server listens on (``free_port()``)."""
    ready_path: str = "/v2/health/ready"
    """``GET`` here answering 200 means ready."""
    log_dir: Path
    """``{name}.stdout.log`` and ``{name}.stderr.log`` are written here."""
    env: Mapping[str, str] = field(default_factory=dict)
    """The child's whole environment (see ``child_env``); empty means an empty environment."""
    ready_timeout_s: float = 240.0
    ready_poll_s: float = 0.5
    stop_grace_s: float = 30.0
    """After SIGINT, how long the server gets to exit on its own before SIGKILL."""
    reap_wait_s: float = 2.0
    """After the group is gone, how long its former members get to vanish before SIGKILL."""
    stderr_tail_lines: int = 40

    @property
    def ready_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}{self.ready_path}"


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer ready in time; the message ends with its stderr."""


@dataclass(frozen=True, kw_only=True)
class StopRecord:
    """How a server went away."""

    exit_code: int | None
    killed: bool
    """True if SIGINT was not enough and the process group got SIGKILL."""
    leftovers_killed: int
    """Processes started under the server that outlived it (e.g. a daemonised proxy)."""
    stop_s: float


@dataclass(frozen=True)
class _ProcStat:
    """The fields of ``/proc/PID/stat`` this module needs."""

    pid: int
    parent: int
    session: int
    start_ticks: int
    """Start time in clock ticks after boot: with the pid, names one process for good."""


def _read_stat(pid: int) -> _ProcStat | None:
    """``/proc/PID/stat`` of a live process (Linux); ``None`` if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) may hold spaces; after its ')' come state (field 3),
    # ppid (4), pgrp (5), session (6) ... starttime (22)
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return _ProcStat(pid, int(fields[1]), int(fields[3]), int(fields[19]))


def _proc_table() -> list[_ProcStat]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    stats = (_read_stat(int(entry.name)) for entry in proc.iterdir() if entry.name.isdigit())
    return [stat for stat in stats if stat is not None]


def _proc_start_ticks(pid: int) -> int | None:
    stat = _read_stat(pid)
    return stat.start_ticks if stat else None


def _still_running(processes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(pid, ticks) for pid, ticks in processes if _proc_start_ticks(pid) == ticks]


def descendants(pid: int, max_processes: int = 10_000) -> list[tuple[int, int]]:
    """``(pid, start_ticks)`` of every live process below ``pid`` or in its session.

    The session catches a child that daemonised (its parent is now init) without ``setsid``;
    the tree catches one that called ``setsid`` but still has its parent. Linux only; an
    empty list elsewhere.
    """
    table = _proc_table()
    children: dict[int, list[_ProcStat]] = {}
    for stat in table:
        children.setdefault(stat.parent, []).append(stat)
    found = {stat.pid: stat.start_ticks for stat in table if stat.session == pid}
    frontier = list(children.get(pid, ()))
    for _ in range(max_processes):
        if not frontier:
            break
        stat = frontier.pop()
        found[stat.pid] = stat.start_ticks
        frontier.extend(children.get(stat.pid, ()))
    found.pop(pid, None)
    return sorted(found.items())


def _kill_if_same(pid: int, start_ticks: int) -> bool:
    """SIGKILL ``pid`` only if it is still the process that started at ``start_ticks``."""
    if _proc_start_ticks(pid) != start_ticks:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


class ServerProcess:
    """One server subprocess; a context manager that starts, waits ready, and always stops."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.stdout_path = spec.log_dir / f"{spec.name}.stdout.log"
        self.stderr_path = spec.log_dir / f"{spec.name}.stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._start_ticks = 0
        self.stop_record: StopRecord | None = None
        self.ready_s: float | None = None

    def start(self) -> None:
        """Start the process in a new process group (its own session), logs to files."""
        self.spec.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.spec.env)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                self.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        self._start_ticks = _proc_start_ticks(self._proc.pid) or 0

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.spec.name} was not started")
        return self._proc.pid

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stderr_tail(self) -> str:
        """The last ``stderr_tail_lines`` lines the server wrote to stderr."""
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no stderr log)"
        return "\n".join(lines[-self.spec.stderr_tail_lines :])

    def _not_ready(self, reason: str) -> ServerNotReady:
        return ServerNotReady(
            f"{self.spec.name} server {reason}; argv: {' '.join(self.spec.argv)}\n"
            f"logs: {self.stdout_path} {self.stderr_path}\n"
            f"--- stderr tail ---\n{self.stderr_tail()}"
        )

    def wait_ready(self) -> float:
        """Poll ``ready_url`` until 200; returns seconds waited. Raises ``ServerNotReady``."""
        if self._proc is None:
            raise RuntimeError(f"{self.spec.name} was not started")
        started = time.monotonic()
        deadline = started + self.spec.ready_timeout_s
        max_polls = int(self.spec.ready_timeout_s / self.spec.ready_poll_s) + 1
        for _ in range(max_polls):
            code = self._proc.poll()
            if code is not None:
                raise self._not_ready(f"exited with code {code} before it was ready")
            try:
                with _DIRECT.open(self.spec.ready_url, timeout=2.0) as answer:
                    if answer.status == 200:
                        self.ready_s = time.monotonic() - started
                        return self.ready_s
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while it loads
            if time.monotonic() >= deadline:
                break
            time.sleep(self.spec.ready_poll_s)
        raise self._not_ready(f"was not ready within {self.spec.ready_timeout_s:g} s")

    def stop(self) -> StopRecord:
        """SIGINT the server; SIGKILL its group after ``stop_grace_s``; reap its leftovers.

        Processes that were below the server when stop began and still live after it exited
        (a proxy that daemonised itself, a worker that ignored the group) get SIGKILL too,
        each checked by start time so a reused pid is never hit. Idempotent.
        """
        if self.stop_record is not None:
            return self.stop_record
        if self._proc is None:
            raise RuntimeError(f"{self.spec.name} was not started")
        began = time.monotonic()
        below = descendants(self._proc.pid)
        killed = False
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=self.spec.stop_grace_s)
            except subprocess.TimeoutExpired:
                killed = True
        # the group may hold more than the leader: whatever is left of it gets SIGKILL
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        if killed:
            self._proc.wait(timeout=10.0)
        # what joined the session after the first look (re-parented daemons) counts too
        # (only processes younger than the server: never one that merely reuses its pid)
        survivors = sorted(
            (pid, ticks)
            for pid, ticks in {*below, *descendants(self._proc.pid)}
            if ticks >= self._start_ticks
        )
        for _ in range(int(self.spec.reap_wait_s / 0.1) + 1):
            survivors = _still_running(survivors)
            if not survivors:
                break
            time.sleep(0.1)
        leftovers = sum(_kill_if_same(pid, ticks) for pid, ticks in survivors)
        self.stop_record = StopRecord(
            exit_code=self._proc.returncode,
            killed=killed,
            leftovers_killed=leftovers,
            stop_s=time.monotonic() - began,
        )
        return self.stop_record

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def describe(self) -> dict[str, Any]:
        """Start and stop facts for the JSON."""
        record = self.stop_record
        return {
            "ready_s": self.ready_s,
            "exit_code": record.exit_code if record else None,
            "killed": record.killed if record else None,
            "leftovers_killed": record.leftovers_killed if record else None,
        }
