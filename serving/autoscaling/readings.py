"""What the autoscaling policy observes: per Serve application, the queue depth, the p95 of
request latency in the replicas, and for generation the waiting sequences and KV-cache use,
read from the monitoring sidecars' metrics or from a Prometheus that scrapes them.

Two readers, one answer (``Reading``):

- ``SidecarReader`` scrapes every sidecar's ``/metrics`` and keeps the scrapes of the last
  ``window_s``; counters and histogram buckets are differenced over that window per replica
  (a replica that came or went in between counts from when it was seen twice), so the queue
  depth is a mean over the window (from ``loom_queue_depth_seconds_total``), not a value at
  one instant, and the p95 is of the requests answered in it.
- ``PrometheusReader`` asks Prometheus's HTTP query API the same questions in PromQL
  (``rate(...[window])``, ``histogram_quantile``), one query per signal for every app.

The parts that compute (``parse_scrape``, ``reading_between``, ``quantile``) are pure; the
readers do the HTTP.

    reader = SidecarReader(lambda: ["127.0.0.1:9470"], window_s=5)
    readings = reader.read()        # {"loom.minilm@3": Reading(queue_depth=12.0, ...)}
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from serving.monitoring.scrape import fetch_text

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.0
"""A sidecar or Prometheus slower than this is missing this round."""
FETCH = functools.partial(fetch_text, timeout_s=FETCH_TIMEOUT_S)
LATENCY_QUANTILE = 0.95


@dataclass(frozen=True)
class Reading:
    """One application's signals over the last window; None where nothing could be read."""

    app: str
    at_s: float
    """When it was read (``time.time``): the policy treats old readings as stale."""
    queue_depth: float | None
    """Inputs (sequences) queued or in progress, summed over the replicas (a window mean)."""
    latency_p95_ms: float | None
    """p95 of the replicas' request latency over the window; 0 when nothing was answered."""
    waiting_sequences: float | None = None
    """Generation: sequences waiting for a slot, summed over the replicas."""
    kv_cache_use: float | None = None
    """Generation: mean share of the KV cache in use."""
    replicas: int = 0
    """Replicas that reported."""


@dataclass
class ReplicaSample:
    """One replica's series in one scrape."""

    app: str
    depth_seconds: float | None = None
    depth: float | None = None
    buckets: dict[float, float] = field(default_factory=dict)
    """Request latency histogram: upper bound (s) -> cumulative count."""
    waiting: float | None = None
    kv_cache_use: float | None = None


Scrape = dict[str, ReplicaSample]
"""Replica id -> its sample, over every sidecar scraped at one time."""


def parse_scrape(text: str, into: Scrape | None = None) -> Scrape:
    """The replica series of one sidecar's Prometheus text (added to ``into``)."""
    scrape: Scrape = {} if into is None else into
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            replica = sample.labels.get("replica")
            app = sample.labels.get("app")
            if not replica or app is None:
                continue
            entry = scrape.setdefault(replica, ReplicaSample(app))
            name, value = sample.name, float(sample.value)
            if name == "loom_queue_depth_seconds_total":
                entry.depth_seconds = value
            elif name == "loom_queue_depth":
                entry.depth = value
            elif name == "loom_replica_request_duration_seconds_bucket":
                entry.buckets[float(sample.labels["le"])] = value
            elif name == "loom_waiting_sequences":
                entry.waiting = value
            elif name == "loom_kv_cache_use_ratio":
                entry.kv_cache_use = value
    return scrape


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated inside its bucket as
    Prometheus's ``histogram_quantile`` does: counts {0.01: 50, 0.1: 100, inf: 100}, q 0.95
    -> rank 95, in (0.01, 0.1] at 45/50 of the way -> 0.091. None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # past the last finite bound: say the last finite bound
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def reading_between(
    app: str, old: Scrape, new: Scrape, elapsed_s: float, *, at_s: float
) -> Reading | None:
    """``app``'s signals from two scrapes ``elapsed_s`` apart; None when ``new`` has no
    replica of it. Counters are differenced per replica seen in both (a restarted replica,
    whose counters went down, counts as new)."""
    replicas = {rid: s for rid, s in new.items() if s.app == app}
    if not replicas:
        return None
    depth = 0.0
    depth_known = False
    seen_twice = False
    buckets: dict[float, float] = {}
    for rid, sample in replicas.items():
        before = old.get(rid)
        if (
            before is not None
            and elapsed_s > 0
            and sample.depth_seconds is not None
            and before.depth_seconds is not None
            and sample.depth_seconds >= before.depth_seconds
        ):
            depth += (sample.depth_seconds - before.depth_seconds) / elapsed_s
            depth_known = seen_twice = True
            for bound, count in sample.buckets.items():
                buckets[bound] = buckets.get(bound, 0.0) + count - before.buckets.get(bound, 0.0)
        elif sample.depth is not None:  # seen once: its depth now stands for the window
            depth += sample.depth
            depth_known = True
    p95 = quantile(LATENCY_QUANTILE, buckets)
    waiting = [s.waiting for s in replicas.values() if s.waiting is not None]
    kv = [s.kv_cache_use for s in replicas.values() if s.kv_cache_use is not None]
    return Reading(
        app=app,
        at_s=at_s,
        queue_depth=depth if depth_known else None,
        # nothing answered in the window: no latency to speak of, and none to scale for; no
        # replica seen twice yet: no window to speak of (missing)
        latency_p95_ms=None if not seen_twice else 0.0 if p95 is None else p95 * 1000.0,
        waiting_sequences=sum(waiting) if waiting else None,
        kv_cache_use=sum(kv) / len(kv) if kv else None,
        replicas=len(replicas),
    )


class SidecarReader:
    """Scrapes the sidecars ``addresses()`` names and answers readings over ``window_s``."""

    def __init__(
        self,
        addresses: Callable[[], Iterable[str]],
        *,
        window_s: float = 5.0,
        fetch: Callable[[str], str] = FETCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._addresses = addresses
        self._window_s = window_s
        self._fetch = fetch
        self._clock = clock
        self._history: deque[tuple[float, Scrape]] = deque()

    def read(self) -> dict[str, Reading]:
        scrape: Scrape = {}
        answered = 0
        for address in self._addresses():
            try:
                parse_scrape(self._fetch(f"http://{address}/metrics"), scrape)
                answered += 1
            except Exception as exc:  # a sidecar down: its replicas are missing, not idle
                logger.info("sidecar %s not read: %s", address, exc)
        now = self._clock()
        if answered == 0:
            return {}
        self._history.append((now, scrape))
        while len(self._history) > 2 and now - self._history[1][0] >= self._window_s:
            self._history.popleft()  # keep the newest scrape at least window_s old
        old_at, old = self._history[0]
        apps = {sample.app for sample in scrape.values()}
        readings = {}
        for app in apps:
            reading = reading_between(app, old, scrape, now - old_at, at_s=now)
            if reading is not None:
                readings[app] = reading
        return readings


class PrometheusReader:
    """Asks Prometheus (``/api/v1/query``) for every app's signals, one query per signal."""

    QUERIES = {
        "queue_depth": "sum by (app) (rate(loom_queue_depth_seconds_total[{w}s]))",
        "requests": "sum by (app) (rate(loom_replica_request_duration_seconds_count[{w}s]))",
        "latency_p95_s": (
            "histogram_quantile(0.95, sum by (app, le) "
            "(rate(loom_replica_request_duration_seconds_bucket[{w}s])))"
        ),
        "waiting_sequences": "sum by (app) (loom_waiting_sequences)",
        "kv_cache_use": "avg by (app) (loom_kv_cache_use_ratio)",
        "replicas": "count by (app) (loom_queue_depth)",
    }

    def __init__(
        self,
        url: str,
        *,
        window_s: float = 10.0,
        fetch: Callable[[str], str] = FETCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url.rstrip("/")
        self._window_s = window_s
        self._fetch = fetch
        self._clock = clock

    def _query(self, promql: str) -> dict[str, float]:
        query = urllib.parse.urlencode({"query": promql})
        answer = json.loads(self._fetch(f"{self._url}/api/v1/query?{query}"))
        if answer.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {promql!r}: {answer.get('error')}")
        values = {}
        for series in answer["data"]["result"]:
            app = series["metric"].get("app")
            if app is not None:
                values[app] = float(series["value"][1])
        return values

    def read(self) -> dict[str, Reading]:
        try:
            answers = {
                name: self._query(q.format(w=int(math.ceil(self._window_s))))
                for name, q in self.QUERIES.items()
            }
        except Exception as exc:  # Prometheus down: every signal missing, nothing scales down
            logger.warning("Prometheus at %s not read: %s", self._url, exc)
            return {}
        now = self._clock()
        readings = {}
        for app, replicas in answers["replicas"].items():
            p95_s = answers["latency_p95_s"].get(app)
            answered = answers["requests"].get(app, 0.0)
            latency = 0.0 if answered == 0 or p95_s is None or math.isnan(p95_s) else p95_s
            readings[app] = Reading(
                app=app,
                at_s=now,
                queue_depth=answers["queue_depth"].get(app),
                latency_p95_ms=latency * 1000.0,
                waiting_sequences=answers["waiting_sequences"].get(app),
                kv_cache_use=answers["kv_cache_use"].get(app),
                replicas=int(replicas),
            )
        return readings
