"""The monitoring sidecar (Burns ch. 3, 14): one process per node beside the model replicas.

It reads each local replica's stats file (``serving.monitoring.stats``), adapts them to
Loom's metric names (``serving.monitoring.adapters``), adds each replica process's CPU and
memory (psutil) and the node's GPUs (NVML, ``serving.monitoring.gpu``), and serves it all as
Prometheus text on its own port, read fresh on every scrape. A replica never waits on it: a
sidecar that is down costs the replicas nothing (their files are still rewritten), and shows
as a scrape target down.

Locally Loom runs it as a Ray actor pinned to the node (``serving.monitoring.sidecar_actor``);
on Kubernetes it is a native sidecar container in each Ray worker pod:

    python -m serving.monitoring.sidecar --stats-dir /var/run/loom/stats --port 9470

    sidecar = Sidecar(SidecarSettings(stats_dir=Path(...), port=0))
    sidecar.start(); sidecar.address      # "127.0.0.1:40123"
    sidecar.stop()
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from serving.monitoring.adapters import Families, export_replica
from serving.monitoring.gpu import GpuReader
from serving.monitoring.stats import StatsFile, live_process, read_stats_dir

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9470
DECISION_KIND = "autoscaler"
"""The kind of a stats file the autoscaling policy writes: its decisions, not a replica's."""
DECISION_LABELS = ("model", "version", "app")


@dataclass(frozen=True)
class SidecarSettings:
    stats_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    """0: any free port (``Sidecar.address`` tells which)."""
    node: str = ""
    """The ``node`` label of every series (default: the host name)."""


class SidecarCollector(Collector):
    """What one scrape returns: every live replica's adapted stats, their processes, the GPUs
    and the sidecar itself. Files left by killed replicas are removed as they are found."""

    def __init__(self, settings: SidecarSettings, gpus: GpuReader | None) -> None:
        self.settings = settings
        self.node = settings.node or socket.gethostname()
        self.gpus = gpus
        self._self = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        families = Families()
        replicas = 0
        for stats in read_stats_dir(self.settings.stats_dir):
            try:
                replicas += self._export_file(families, stats)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # one malformed file costs its own series, not the whole scrape
                logger.warning("stats file %s not exported: %r", stats.path.name, exc)
        self._export_gpus(families)
        cpu = self._self.cpu_times()
        labels = ("node",)
        families.counter(
            "loom_sidecar_cpu_seconds",
            "CPU time the sidecar has used (user + system).",
            labels,
            [self.node],
            cpu.user + cpu.system,
        )
        families.gauge(
            "loom_sidecar_memory_bytes",
            "The sidecar's resident memory.",
            labels,
            [self.node],
            self._self.memory_info().rss,
        )
        families.gauge(
            "loom_sidecar_replicas", "Replicas this sidecar reports.", labels, [self.node], replicas
        )
        yield from families.collect()

    def _export_file(self, families: Families, stats: StatsFile) -> int:
        """One stats file's series: 1 for a replica reported, else 0 (a decision, a file
        left by a replica that is gone and removed now, a kind no adapter knows)."""
        if stats.document.get("kind") == DECISION_KIND:
            export_decision(families, stats.document)
            return 0
        process = live_process(stats)
        if process is None:
            logger.info("removing the stats of a replica that is gone: %s", stats.path.name)
            with contextlib.suppress(OSError):
                stats.path.unlink()
            return 0
        if not export_replica(families, stats.document, node=self.node):
            return 0
        self._export_process(families, stats, process)
        return 1

    def _export_process(
        self, families: Families, stats: StatsFile, process: psutil.Process
    ) -> None:
        document = stats.document
        labels = ("replica", "kind", "node")
        values = [str(document.get("replica")), str(document.get("kind")), self.node]
        try:
            cpu = process.cpu_times()
            rss = process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        families.counter(
            "loom_replica_cpu_seconds",
            "CPU time the replica's process has used (user + system).",
            labels,
            values,
            cpu.user + cpu.system,
        )
        families.gauge(
            "loom_replica_memory_bytes",
            "The replica process's resident memory.",
            labels,
            values,
            rss,
        )
        families.gauge(
            "loom_replica_stats_age_seconds",
            "Seconds since the replica last wrote its stats (it rewrites them every second).",
            labels,
            values,
            max(0.0, time.time() - stats.written_s),
        )

    def _export_gpus(self, families: Families) -> None:
        if self.gpus is None:
            return
        labels = ("node", "gpu", "uuid")
        for gpu in self.gpus.read():
            values = [self.node, str(gpu.index), gpu.uuid]
            families.gauge(
                "loom_gpu_utilization_ratio",
                "Share of the last sample period a kernel ran on the GPU.",
                labels,
                values,
                gpu.utilization_ratio,
            )
            families.gauge(
                "loom_gpu_memory_used_bytes", "GPU memory in use.", labels, values,
                gpu.memory_used_bytes,
            )  # fmt: skip
            families.gauge(
                "loom_gpu_memory_total_bytes", "GPU memory in all.", labels, values,
                gpu.memory_total_bytes,
            )  # fmt: skip
            if gpu.power_watts is not None:
                families.gauge(
                    "loom_gpu_power_watts", "GPU board power draw.", labels, values,
                    gpu.power_watts,
                )  # fmt: skip


def export_decision(families: Families, document: dict[str, Any]) -> None:
    """The autoscaling policy's latest decision for one deployment (a file it writes beside
    the replicas' stats, ``serving.autoscaling.ray_policy``)."""
    for entry in document.get("models", []):
        values = [str(entry["model"]), str(entry["version"]), str(document.get("app", ""))]
        gauges = entry.get("gauges", {})
        for stat, metric, help in (
            ("desired_replicas", "loom_autoscaler_desired_replicas", "Replicas the policy wants."),
            ("current_replicas", "loom_autoscaler_current_replicas", "Replicas running now."),
        ):
            if stat in gauges:
                families.gauge(metric, help, DECISION_LABELS, values, gauges[stat])
        deciding = entry.get("deciding")
        for name, observed in entry.get("signals", {}).items():
            labels = (*DECISION_LABELS, "signal")
            if observed is not None:
                families.gauge(
                    "loom_autoscaler_signal",
                    "What the policy observed of each signal (per replica, or ms, or a share).",
                    labels,
                    [*values, name],
                    observed,
                )
            families.gauge(
                "loom_autoscaler_deciding_signal",
                "1 for the signal that decided the replica count, else 0.",
                labels,
                [*values, name],
                1.0 if name == deciding else 0.0,
            )


class Sidecar:
    """The sidecar's HTTP server (``/metrics``, any path) on its own thread."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.gpus = GpuReader.open()
        self.registry = CollectorRegistry()
        self.collector = SidecarCollector(settings, self.gpus)
        self.registry.register(self.collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.settings.stats_dir.mkdir(parents=True, exist_ok=True)
        self._server, self._thread = start_http_server(
            self.settings.port, addr=self.settings.host, registry=self.registry
        )
        logger.info("monitoring sidecar on %s, reading %s", self.address, self.settings.stats_dir)

    @property
    def port(self) -> int:
        return int(self._server.server_port) if self._server is not None else self.settings.port

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.gpus is not None:
            self.gpus.close()
            self.gpus = None


def main(argv: list[str] | None = None) -> int:
    """Run a sidecar in the foreground until SIGTERM or Ctrl-C (a container's entry point)."""
    parser = argparse.ArgumentParser(prog="python -m serving.monitoring.sidecar")
    parser.add_argument("--stats-dir", type=Path, required=True, help="the node's stats folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free)")
    parser.add_argument("--node", default=os.environ.get("HOSTNAME", ""), help="node label")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sidecar = Sidecar(
        SidecarSettings(stats_dir=args.stats_dir, host=args.host, port=args.port, node=args.node)
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    sidecar.start()
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sidecar.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
