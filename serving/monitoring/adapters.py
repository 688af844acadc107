"""Adapters (Burns ch. 5): a replica's stats, in the names it keeps, to Loom's metric names.

A replica reports what it counts (``serving.monitoring.stats``): ``inputs``, ``batch_size``,
``running``... Each replica kind has an adapter, a table from those stat names to a metric
name, type and help; what a table does not name is not exported, so the metric names are
this module's contract (``docs/monitoring.md``) and a replica can add a stat without
changing what Prometheus sees. Every series gets the labels ``replica``, ``model``,
``version``, ``app`` (the Serve application: a version, or a shard's version), ``kind`` and
``node``.

    families = Families()
    export_replica(families, stats_file.document, node="a1b2")
    families.collect()      # prometheus_client Metric families, one per name
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

Labels = tuple[str, ...]

REPLICA_LABELS = ("replica", "model", "version", "app", "kind", "node")


@dataclass(frozen=True)
class Exported:
    """How one stat is exported: ``metric`` (without ``_total`` for a counter) and help."""

    metric: str
    help: str


# what every replica kind reports
COMMON_COUNTERS = {
    "rejected": Exported("loom_rejected", "Inputs refused by admission control (queue full)."),
    "expired": Exported(
        "loom_expired_inputs",
        "Inputs dropped uncomputed: their deadline passed before the engine ran them.",
    ),
    "queue_depth_seconds": Exported(
        "loom_queue_depth_seconds",
        "Time integral of the queue depth: its rate() is the mean depth over the window.",
    ),
}
COMMON_GAUGES = {
    "queue_depth": Exported(
        "loom_queue_depth", "Inputs (sequences, for generation) admitted and not yet answered."
    ),
    "in_flight": Exported("loom_in_flight", "Requests in progress in the replica."),
    "load_seconds": Exported(
        "loom_model_load_seconds", "Seconds the replica took to load and warm up the model."
    ),
}
COMMON_HISTOGRAMS = {
    "request_seconds": Exported(
        "loom_replica_request_duration_seconds",
        "Time from a request's admission in the replica to its answer.",
    ),
}


@dataclass(frozen=True)
class Adapter:
    """One replica kind's table: stat name -> exported metric, by type."""

    kind: str
    counters: Mapping[str, Exported]
    gauges: Mapping[str, Exported]
    histograms: Mapping[str, Exported]


ROWS = Adapter(
    kind="rows",
    counters={
        **COMMON_COUNTERS,
        "inputs": Exported("loom_inputs", "Inputs (texts, rows) computed."),
        "model_loads": Exported(
            "loom_model_loads", "Times the model was loaded into a running pool replica."
        ),
    },
    gauges={
        **COMMON_GAUGES,
        "max_batch_size": Exported(
            "loom_max_batch_size",
            "Most inputs in one engine run (batch fill = mean batch size / this).",
        ),
    },
    histograms={
        **COMMON_HISTOGRAMS,
        "batch_size": Exported("loom_batch_size", "Inputs per engine run."),
        "engine_seconds": Exported("loom_batch_duration_seconds", "Engine time per batch."),
    },
)
GENERATE = Adapter(
    kind="generate",
    counters={
        **COMMON_COUNTERS,
        "tokens": Exported("loom_generated_tokens", "Tokens generated."),
    },
    gauges={
        **COMMON_GAUGES,
        "running": Exported("loom_running_sequences", "Sequences in the running batch."),
        "waiting": Exported("loom_waiting_sequences", "Sequences admitted but waiting for a slot."),
        "kv_cache_use": Exported(
            "loom_kv_cache_use_ratio", "Share of the KV cache's tokens in use (0..1)."
        ),
    },
    histograms={
        **COMMON_HISTOGRAMS,
        "ttft_seconds": Exported(
            "loom_time_to_first_token_seconds",
            "Time from a sequence's arrival at its replica to its first generated text.",
        ),
        "itl_seconds": Exported(
            "loom_inter_token_latency_seconds",
            "Time between a sequence's successive tokens.",
        ),
    },
)
ADAPTERS = {adapter.kind: adapter for adapter in (ROWS, GENERATE)}
"""One adapter per replica kind (the ``kind`` a stats file names)."""


class Families:
    """Metric families by name, filled from many replicas, collected once per scrape."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def family(self, kind: Callable[..., Metric], name: str, help: str, labels: Labels) -> Any:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = kind(name, help, labels=list(labels))
        return family

    def gauge(self, name: str, help: str, labels: Labels, values: list[str], v: float) -> None:
        self.family(GaugeMetricFamily, name, help, labels).add_metric(values, v)

    def counter(self, name: str, help: str, labels: Labels, values: list[str], v: float) -> None:
        self.family(CounterMetricFamily, name, help, labels).add_metric(values, v)

    def collect(self) -> Iterator[Metric]:
        yield from self._families.values()


def export_replica(families: Families, document: Mapping[str, Any], *, node: str) -> bool:
    """Add one replica's stats to ``families`` through its kind's adapter; False (nothing
    added) for a kind no adapter knows."""
    adapter = ADAPTERS.get(str(document.get("kind")))
    if adapter is None:
        return False
    replica, app = str(document.get("replica", "")), str(document.get("app", ""))
    for model in document.get("models", []):
        values = [replica, str(model["model"]), str(model["version"]), app, adapter.kind, node]
        for stat, value in model.get("counters", {}).items():
            if (exported := adapter.counters.get(stat)) is not None:
                families.counter(exported.metric, exported.help, REPLICA_LABELS, values, value)
        for stat, value in model.get("gauges", {}).items():
            if (exported := adapter.gauges.get(stat)) is not None:
                families.gauge(exported.metric, exported.help, REPLICA_LABELS, values, value)
        for stat, histogram in model.get("histograms", {}).items():
            if (exported := adapter.histograms.get(stat)) is not None:
                family = families.family(
                    HistogramMetricFamily, exported.metric, exported.help, REPLICA_LABELS
                )
                family.add_metric(values, cumulative_buckets(histogram), histogram["sum"])
    return True


def cumulative_buckets(histogram: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Per-bucket counts -> Prometheus's cumulative ``(le, count)`` pairs ending at +Inf:
    counts [2, 3, 1] over le [0.1, 1] -> [("0.1", 2), ("1", 5), ("+Inf", 6)]."""
    bounds = [_le_text(le) for le in histogram["le"]] + ["+Inf"]
    total = 0.0
    pairs = []
    for bound, count in zip(bounds, histogram["counts"], strict=True):
        total += count
        pairs.append((bound, total))
    return pairs


def _le_text(le: float) -> str:
    return repr(float(le)) if float(le) != int(le) else f"{int(le)}.0"
