"""The readers the autoscaling policies of one process share: one thread per metrics source
reads every application's signals every ``interval_s``, and each policy takes its app's
latest ``Reading`` without waiting (Serve calls a policy on its controller's loop, ten times
a second: it must not block on HTTP).

    poller = poller_for(Source(stats_dir="/var/run/loom/stats", prometheus_url=None))
    poller.latest("loom.minilm@3")      # a Reading, or None before the first read
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.autoscaling.readings import PrometheusReader, Reading, SidecarReader

logger = logging.getLogger(__name__)

SIDECARS_REFRESH_S = 10.0
"""How often the sidecars' addresses are looked up again (a sidecar restarted on a new port)."""


@dataclass(frozen=True)
class Source:
    """Where readings come from: Prometheus when ``prometheus_url`` is set, else the sidecars
    that read ``stats_dir``."""

    stats_dir: str
    prometheus_url: str | None = None
    interval_s: float = 1.0
    window_s: float = 5.0
    sidecar_port: int = 0
    """With ``sidecar_actors`` off: the port of each node's sidecar container."""
    sidecar_actors: bool = True
    """The sidecars are Ray actors (found by name), else containers (found by node)."""


class SidecarDirectory:
    """The sidecars' addresses, looked up at most every ``SIDECARS_REFRESH_S`` (at once
    after a read found none)."""

    def __init__(self, lookup: Callable[[], list[str]]) -> None:
        self._lookup = lookup
        self._addresses: list[str] = []
        self._looked_up_s = -SIDECARS_REFRESH_S

    def __call__(self) -> list[str]:
        now = time.monotonic()
        if not self._addresses or now - self._looked_up_s >= SIDECARS_REFRESH_S:
            try:
                self._addresses = self._lookup()
            except Exception as exc:
                logger.warning("sidecars not listed: %s", exc)
            self._looked_up_s = now
        return self._addresses


class ReadingPoller:
    """Reads every app's signals every ``interval_s`` in a daemon thread."""

    def __init__(self, read: Callable[[], dict[str, Reading]], interval_s: float) -> None:
        self._read = read
        self._interval_s = interval_s
        self._latest: dict[str, Reading] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loom-readings", daemon=True)
        self._thread.start()

    def latest(self, app: str) -> Reading | None:
        return self._latest.get(app)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._latest = {**self._latest, **self._read()}  # an app not read keeps its
                # last reading, which ages into staleness rather than vanishing
            except Exception:
                logger.exception("autoscaling readings failed")
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()


_POLLERS: dict[Source, ReadingPoller] = {}
_LOCK = threading.Lock()


def poller_for(source: Source) -> ReadingPoller:
    """The process's poller for ``source`` (started on first use)."""
    with _LOCK:
        poller = _POLLERS.get(source)
        if poller is None:
            if source.prometheus_url:
                reader: PrometheusReader | SidecarReader = PrometheusReader(
                    source.prometheus_url, window_s=source.window_s
                )
            else:
                from serving.monitoring.sidecar_actor import node_sidecars, sidecar_addresses

                def lookup() -> list[str]:
                    if source.sidecar_actors:
                        return sidecar_addresses(source.stats_dir)
                    return [found["address"] for found in node_sidecars(source.sidecar_port)]

                reader = SidecarReader(SidecarDirectory(lookup), window_s=source.window_s)
            poller = _POLLERS[source] = ReadingPoller(reader.read, source.interval_s)
        return poller
