"""What a replica reports to its node's monitoring sidecar: one small JSON file per replica.

The interface between a replica and the sidecar (Burns ch. 3) is a folder on the node: each
replica rewrites ``<stats_dir>/<replica>.json`` every ``interval_s`` (a temp file renamed
over the old one, so a reader never sees half a file) and removes it when it stops. The
sidecar reads the folder on each scrape. Nothing in the replica runs Prometheus code; the
sidecar's adapters (``serving.monitoring.adapters``) turn these stats into Loom's metric names.

The file (``schema`` 1)::

    {"schema": 1, "replica": "abc123", "kind": "rows", "pid": 4242, "started_s": 1.7e9,
     "written_s": 1.7e9, "app": "loom.minilm@3",
     "models": [{"model": "minilm", "version": "3",
                 "counters": {"inputs": 96, "queue_depth_seconds": 1.5, ...},
                 "gauges": {"queue_depth": 4, "max_batch_size": 64, ...},
                 "histograms": {"batch_size": {"le": [1, 2, ...], "counts": [..],
                                               "sum": 96, "count": 3}, ...}}]}

``counts`` are per bucket (not cumulative), one more than ``le`` (the last is +Inf).
``started_s`` is the process's start time (from the OS): with ``pid`` it tells a live
replica's file from one a killed replica left behind, even when the pid is reused.

    stats = ReplicaStats(replica="abc123", kind="rows", app="loom.minilm@3")
    model = stats.model("minilm", "3")
    model.inc("inputs", 32); model.observe("batch_size", 32); model.enter(32, requests=1)
    reporter = StatsReporter(stats, Path("/var/run/loom/stats"))   # writes every second
    reporter.close()                                                  # and removes the file
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

SCHEMA = 1
INTERVAL_S = 1.0
"""How often a replica rewrites its file: the freshest a scrape or a scaling decision sees."""

# seconds: 1 ms .. 30 s, dense where small-model latencies fall
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)

HISTOGRAM_BUCKETS: dict[str, Sequence[float]] = {
    "batch_size": BATCH_SIZE_BUCKETS,
    "engine_seconds": LATENCY_BUCKETS_S,
    "request_seconds": LATENCY_BUCKETS_S,
    "ttft_seconds": LATENCY_BUCKETS_S,
    "itl_seconds": LATENCY_BUCKETS_S,
}
"""Every histogram a replica keeps, by stat name, with its bucket bounds."""


class Histogram:
    """Counts per bucket (``le`` bounds, then +Inf), their sum and count."""

    __slots__ = ("counts", "count", "le", "sum")

    def __init__(self, le: Sequence[float]) -> None:
        self.le = tuple(le)
        self.counts = [0] * (len(self.le) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """``value`` seen ``times`` times (the requests of one joined call, say)."""
        self.counts[bisect.bisect_left(self.le, value)] += times  # le inclusive: 1.0 -> "1.0"
        self.sum += value * times
        self.count += times

    def as_json(self) -> dict[str, Any]:
        return {
            "le": list(self.le),
            "counts": list(self.counts),
            "sum": self.sum,
            "count": self.count,
        }


class ModelStats:
    """One model's stats in a replica (a pool replica holds several). Safe to update from the
    replica's event loop and its engine thread at once (one lock, held for an addition)."""

    def __init__(self, model: str, version: str, lock: threading.Lock) -> None:
        self.model = model
        self.version = version
        self._lock = lock
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}
        self.histograms: dict[str, Histogram] = {}
        self._depth = 0.0
        self._depth_since_s = time.monotonic()
        self._depth_seconds = 0.0

    def inc(self, name: str, by: float = 1.0) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0.0) + by

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def observe(self, name: str, value: float, times: int = 1) -> None:
        with self._lock:
            self._observe(name, value, times)

    def _observe(self, name: str, value: float, times: int) -> None:
        histogram = self.histograms.get(name)
        if histogram is None:
            histogram = self.histograms[name] = Histogram(HISTOGRAM_BUCKETS[name])
        histogram.observe(value, times)

    def enter(self, units: float, requests: int) -> None:
        """``requests`` came in holding ``units`` inputs (sequences): the queue depth and the
        requests in flight, under one lock (a call's way in)."""
        with self._lock:
            self._shift(units, requests)

    def leave(self, units: float, requests: int, seconds: float | None = None) -> None:
        """The reverse of ``enter``; with ``seconds``, each request's time in the replica
        observed too (``request_seconds``)."""
        with self._lock:
            self._shift(-units, -requests)
            if seconds is not None:
                self._observe("request_seconds", seconds, requests)

    def _shift(self, units: float, requests: int) -> None:
        """The queue depth keeps its time integral too, so a reader gets the mean depth over
        any interval, not the value at one instant: 4 queued for 0.5 s then 0 for 0.5 s ->
        2.0 queue-depth-seconds per second."""
        self._advance_depth()
        self._depth += units
        self.gauges["in_flight"] = self.gauges.get("in_flight", 0.0) + requests

    def _advance_depth(self) -> None:
        now = time.monotonic()
        self._depth_seconds += self._depth * (now - self._depth_since_s)
        self._depth_since_s = now

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            self._advance_depth()
            counters = {**self.counters, "queue_depth_seconds": self._depth_seconds}
            gauges = {**self.gauges, "queue_depth": self._depth}
            return {
                "model": self.model,
                "version": self.version,
                "counters": counters,
                "gauges": gauges,
                "histograms": {name: h.as_json() for name, h in self.histograms.items()},
            }


def replica_stats(kind: str) -> ReplicaStats:
    """The stats of the Serve replica this runs in (or of this process, outside Serve)."""
    replica, app = replica_identity()
    return ReplicaStats(replica=replica, kind=kind, app=app)


def replica_identity() -> tuple[str, str]:
    """This Serve replica's unique id and its application's name (``loom.minilm@3``);
    ``("pid-<pid>", "")`` outside Serve (a test, a benchmark)."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return str(context.replica_id.unique_id), str(context.app_name)
    except Exception:  # not in a Serve replica
        return f"pid-{os.getpid()}", ""


def process_started_s(pid: int) -> float | None:
    """When process ``pid`` started (the OS's clock), or None when there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class ReplicaStats:
    """Everything one replica reports: its identity and its models' stats."""

    def __init__(self, *, replica: str, kind: str, app: str = "") -> None:
        self.replica = replica
        self.kind = kind
        self.app = app
        self.pid = os.getpid()
        self.started_s = process_started_s(self.pid) or time.time()
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], ModelStats] = {}

    def model(self, name: str, version: str) -> ModelStats:
        """The stats of model ``name`` at ``version`` (made on first use)."""
        with self._lock:
            stats = self._models.get((name, version))
            if stats is None:
                stats = self._models[(name, version)] = ModelStats(name, version, self._lock)
            return stats

    def counted(self, name: str, stat: str) -> float:
        """Counter ``stat`` of model ``name``, over its versions (``inputs``: rows computed)."""
        with self._lock:
            models = [m for (n, _), m in self._models.items() if n == name]
        return sum(m.counters.get(stat, 0.0) for m in models)

    def observations(self, name: str, stat: str) -> int:
        """How many values histogram ``stat`` of model ``name`` holds (``batch_size``: runs)."""
        with self._lock:
            models = [m for (n, _), m in self._models.items() if n == name]
        return sum(m.histograms[stat].count for m in models if stat in m.histograms)

    def drop(self, name: str, version: str) -> None:
        """Stop reporting a model the replica no longer holds (a pool member evicted)."""
        with self._lock:
            self._models.pop((name, version), None)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            models = list(self._models.values())
        return {
            "schema": SCHEMA,
            "replica": self.replica,
            "kind": self.kind,
            "app": self.app,
            "pid": self.pid,
            "started_s": self.started_s,
            "written_s": time.time(),
            "models": [m.as_json() for m in models],
        }


def stats_path(directory: Path, replica: str) -> Path:
    """``<directory>/<replica>.json``; the replica id is Serve's (letters and digits)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in replica)
    return directory / f"{safe}.json"


def write_atomically(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as JSON so a concurrent reader sees the old file or the new one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(document, separators=(",", ":")))
    os.replace(temp, path)


class StatsReporter:
    """Rewrites a replica's stats file every ``interval_s`` in a daemon thread until closed;
    closing removes the file (a replica that stops is not reported as one that died)."""

    def __init__(self, stats: ReplicaStats, directory: Path, *, interval_s: float = INTERVAL_S):
        self.stats = stats
        self.path = stats_path(directory, stats.replica)
        self.interval_s = interval_s
        directory.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self.write()  # the sidecar sees the replica from its first second
        self._thread = threading.Thread(target=self._run, name="loom-stats", daemon=True)
        self._thread.start()

    def write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a start cleaning run/ took it
            write_atomically(self.path, self.stats.snapshot())
        except OSError as exc:  # a full or removed folder: the replica keeps serving
            logger.warning("stats file %s not written: %s", self.path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.path.unlink()


@dataclass(frozen=True)
class StatsFile:
    """One replica's stats as read by the sidecar."""

    path: Path
    document: dict[str, Any]

    @property
    def pid(self) -> int:
        return int(self.document.get("pid", 0))

    @property
    def written_s(self) -> float:
        return float(self.document.get("written_s", 0.0))


def read_stats_dir(directory: Path) -> Iterator[StatsFile]:
    """Every readable stats file in ``directory`` (a file that vanished or does not parse is
    skipped: a replica may be rewriting or removing it right now)."""
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return
    for path in paths:
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and document.get("schema") == SCHEMA:
            yield StatsFile(path, document)


def live_process(stats: StatsFile) -> psutil.Process | None:
    """The process that wrote ``stats``, still running; None when it is gone (killed, not
    stopped): its pid is not running, or runs a process that started at another time (the
    pid was reused). One ``psutil.Process`` per file and scrape, for the check and the
    readings of its CPU and memory both."""
    try:
        process = psutil.Process(stats.pid)
        started = float(process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if abs(started - float(stats.document.get("started_s", 0))) > 1.0:
        return None
    return process
