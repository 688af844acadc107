"""The run record: what a running ``loom serve`` started, so the next start can clean up after a
run that was killed (SIGKILL, OOM, a power cut) instead of stopped.

A server writes ``$LOOM_HOME/run/serve-<port>.json`` once its local Ray is up: its own pid and
that pid's start time (so a reused pid is not taken for it), the Ray session folder it
started, and its metrics folder. A clean stop removes the record. A SIGKILL leaves it, and
leaves processes behind: Ray binds its head processes to the server's life (they die with it),
but not all of them (seen here, Ray 2.60: the dashboard and runtime-env agents outlive it as
orphans, holding ports, and a replica may take seconds to notice its raylet is gone). On
start, ``clean_dead_runs`` reads every record in the folder; for one whose server is gone it
ends every process still using that Ray session (each has the session's log files open),
removes the dead run's metrics folder and the record. A record of a server that still runs
(another ``loom serve`` on the same home) is left alone.

    records = RunRecords(env.run_dir)
    records.clean_dead_runs()                                   # before binding the port
    records.write(RunRecord.for_this_process(port=8000, ray_session_dir=..., metrics_dir=...))
    ...; records.remove(8000)                                   # on a clean stop

Only what this module reads from ``/proc`` is Linux-specific; elsewhere nothing is found and
nothing is killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

RECORD_PREFIX = "serve-"
TERM_GRACE_S = 5.0
"""How long a leftover has after SIGTERM before it gets SIGKILL."""
_PROC = Path("/proc")


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One running server, as its runtime file records it."""

    pid: int
    """The ``loom serve`` process."""
    pid_start_ticks: int | None
    """When that pid started (``/proc/<pid>/stat`` field 22, clock ticks since boot): a pid
    reused by another process after a crash has another start time."""
    port: int
    ray_session_dir: str | None
    """The Ray session folder of the local Ray it started; None when it joined a running Ray
    (that Ray is not its to clean)."""
    metrics_dir: str | None = None
    """Its replicas' metrics samples (a runtime file of that run too)."""

    @classmethod
    def for_this_process(
        cls, *, port: int, ray_session_dir: str | None, metrics_dir: str | None
    ) -> RunRecord:
        pid = os.getpid()
        return cls(
            pid=pid,
            pid_start_ticks=process_start_ticks(pid),
            port=port,
            ray_session_dir=ray_session_dir,
            metrics_dir=metrics_dir,
        )

    def server_alive(self) -> bool:
        """True while the recorded server still runs (the same process, not a reused pid)."""
        started = process_start_ticks(self.pid)
        if started is None:
            return False
        return self.pid_start_ticks is None or started == self.pid_start_ticks

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text)
        return cls(
            pid=int(data["pid"]),
            pid_start_ticks=None
            if data["pid_start_ticks"] is None
            else int(data["pid_start_ticks"]),
            port=int(data["port"]),
            ray_session_dir=data["ray_session_dir"],
            metrics_dir=data.get("metrics_dir"),
        )


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces), or None if the
    process is gone or a zombie (dead, only waiting to be reaped: it holds nothing)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return None if not fields or fields[0] in ("Z", "X") else fields


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if no such live process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None  # field 22 of the whole line


def session_processes(session_dir: str) -> list[int]:
    """Live processes (this one aside) using the Ray session ``session_dir``: a file of it open
    (every Ray process keeps its logs there) or the folder on its command line. Processes of
    other users cannot be read, and are not ours to end anyway."""
    prefix = session_dir.rstrip("/") + "/"
    found = []
    for entry in _proc_pids():
        if entry == os.getpid() or _stat_fields(entry) is None:
            continue
        if _uses_session(entry, prefix):
            found.append(entry)
    return sorted(found)


def _proc_pids() -> Iterator[int]:
    try:
        names = os.listdir(_PROC)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def _uses_session(pid: int, prefix: str) -> bool:
    with contextlib.suppress(OSError):
        if prefix.encode() in (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" "):
            return True
    fd_dir = _PROC / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd_dir / fd).startswith(prefix):
                return True
    return False


def end_processes(
    pids: list[int],
    *,
    grace_s: float = TERM_GRACE_S,
    alive: Callable[[int], bool] = lambda pid: _stat_fields(pid) is not None,
) -> list[int]:
    """SIGTERM each of ``pids``, then SIGKILL what still runs after ``grace_s``; wait until
    each is gone (what ``/proc`` reports, not a fixed sleep). Returns the pids that could not
    be ended (another user's, say)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s  # SIGKILL cannot be refused; this only waits for it
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def _is_ray_session_dir(path: str) -> bool:
    """``/tmp/ray/session_2026-12-05_19-07-17_855832_24201``: an absolute path whose last part
    is a Ray session's (so a damaged record can never make every process look like ours)."""
    parts = Path(path).parts
    return Path(path).is_absolute() and len(parts) >= 3 and parts[-1].startswith("session_")


class RunRecords:
    """The run records under one server home's ``run/`` folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def path(self, port: int) -> Path:
        return self.run_dir / f"{RECORD_PREFIX}{port}.json"

    def write(self, record: RunRecord) -> Path:
        """Write ``record`` atomically (a reader sees the old file or the new, never half)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.path(record.port)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(record.to_json())
        os.replace(tmp, path)
        return path

    def remove(self, port: int) -> None:
        self.path(port).unlink(missing_ok=True)

    def read_all(self) -> list[tuple[Path, RunRecord | None]]:
        """Every record file with its record (None for one that cannot be read)."""
        if not self.run_dir.is_dir():
            return []
        records: list[tuple[Path, RunRecord | None]] = []
        for path in sorted(self.run_dir.glob(f"{RECORD_PREFIX}*.json")):
            try:
                records.append((path, RunRecord.from_json(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                records.append((path, None))
        return records

    def clean_dead_runs(self) -> list[RunRecord]:
        """End what each killed run left (its Ray session's processes), remove its metrics
        folder and its record; leave a live server's alone. Returns the dead runs cleaned."""
        cleaned = []
        for path, record in self.read_all():
            if record is None:
                logger.warning("removing %s: not a run record this server can read", path)
                path.unlink(missing_ok=True)
                continue
            if record.server_alive():
                logger.info(
                    "a server (pid %d, port %d) still runs on this home; its run is left alone",
                    record.pid,
                    record.port,
                )
                continue
            self._clean(record)
            path.unlink(missing_ok=True)
            cleaned.append(record)
        for stale in self.run_dir.glob(f".{RECORD_PREFIX}*.tmp") if self.run_dir.is_dir() else ():
            stale.unlink(missing_ok=True)  # a write cut short by the kill
        return cleaned

    def _clean(self, record: RunRecord) -> None:
        session = record.ray_session_dir
        if session is not None and not _is_ray_session_dir(session):
            logger.warning(
                "run record of pid %d names %r as its Ray session: ignored", record.pid, session
            )
            session = None
        leftovers = session_processes(session) if session else []
        if leftovers:
            logger.warning(
                "a server (pid %d, port %d) was killed without stopping: ending %d process(es) "
                "of its Ray session %s: %s",
                record.pid,
                record.port,
                len(leftovers),
                record.ray_session_dir,
                ", ".join(map(str, leftovers)),
            )
            stuck = end_processes(leftovers)
            if stuck:
                logger.warning("could not end %s; they may hold ports", ", ".join(map(str, stuck)))
        else:
            logger.info(
                "a server (pid %d, port %d) was killed without stopping; nothing of it runs",
                record.pid,
                record.port,
            )
        metrics_dir = Path(record.metrics_dir) if record.metrics_dir else None
        if metrics_dir is not None and metrics_dir.resolve().parent == self.run_dir.resolve():
            shutil.rmtree(metrics_dir, ignore_errors=True)  # only a folder of this run/ folder
