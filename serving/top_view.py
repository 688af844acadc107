"""What ``loom top`` shows, computed from plain values: no I/O, no clock, no terminal.

A frame is a :class:`Scrape` (the gateway's ``/metrics`` and every monitoring sidecar's,
parsed, and when they were read) and the models ``/v1/status`` names. Two successive scrapes
make rates: ``build_rows(models, previous, current)`` returns one :class:`ModelRow` per
model, each value None where no source has it (the table shows ``-``).

    scrape = Scrape(taken_s=12.0, gateway=parse_metrics(text), sidecars={})
    rows = build_rows(served_models(status_json), previous=None, current=scrape)
    row_cells(rows[0])   # ("minilm", "1", "2/-", "-", "4.1", "9.8", "0", "-")

Where each column comes from (metric names: ``docs/api.md``, the monitoring contract):

- replicas running: distinct ``replica`` labels of the model's sidecar series; with no
  sidecar series for the model, Serve's count from ``/v1/status``;
- replicas desired: ``loom_autoscaler_desired_replicas``, summed over the model's versions;
- req/s: the growth of the gateway's ``loom_requests_total{model}`` between two scrapes,
  over the seconds between them;
- p50/p95: the gateway's ``loom_request_duration_seconds`` buckets, growth between two
  scrapes (the cumulative buckets on the first frame), interpolated as PromQL's
  ``histogram_quantile`` does;
- queue depth: ``loom_queue_depth`` summed over the model's replicas (sidecars); else the
  gateway's own merged gauge of one node;
- GPU: the mean ``loom_gpu_utilization_ratio`` of each node that hosts one of the model's
  replicas, averaged over those nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from serving.routing.sharding import SHARD_SEPARATOR

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name (hashable, so a series can key a dict)."""
SeriesKey = tuple[str, Labels]
"""A sample's name (``loom_requests_total``, ``..._bucket``) and labels."""
Samples = Mapping[SeriesKey, float]

MODEL_DEPLOYMENT_PREFIX = "model-"
"""How ``/v1/status`` names a model's entry (``serving.replicas.deployment``'s
``DEPLOYMENT_PREFIX``; not imported from there, as that module imports Ray)."""
NO_VALUE = "-"


def parse_metrics(text: str) -> dict[SeriesKey, float]:
    """Every sample of a Prometheus text exposition. ``_created`` samples (when a series was
    born, not a reading) are left out. Raises ValueError on text that is not exposition."""
    samples: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


@dataclass(frozen=True)
class Scrape:
    """The samples of one frame and the monotonic second they were read."""

    taken_s: float
    gateway: Samples
    """The gateway's ``/metrics``."""
    sidecars: Samples
    """Every reachable sidecar's ``/metrics``, merged (their series differ by ``node`` and
    ``replica``; a series two sidecars both export, an autoscaler decision say, is kept once)."""


@dataclass(frozen=True)
class ServedModel:
    """One model as ``/v1/status`` reports it."""

    name: str
    versions: tuple[tuple[str, float], ...]
    """(version, route weight 0..1), shards folded into their version, sorted by version."""
    running_replicas: int
    """Serve's running replicas over every version app of the model."""


@dataclass(frozen=True)
class ModelRow:
    """One line of the table; None where no source has the value."""

    model: str
    versions: tuple[tuple[str, float], ...]
    running_replicas: int | None
    desired_replicas: int | None
    requests_per_s: float | None
    p50_ms: float | None
    p95_ms: float | None
    queue_depth: float | None
    gpu_utilization_ratio: float | None


def served_models(status: Mapping[str, Any]) -> list[ServedModel]:
    """The models of a ``/v1/status`` answer (``serving.gateway.readiness``), by name. A
    sharded model's ``1~0``, ``1~1`` fold into version ``1`` (weight: the largest of its
    shards', as every shard routes alike). Raises KeyError/TypeError on another shape."""
    models = []
    for name, entry in status["deployments"].items():
        if not name.startswith(MODEL_DEPLOYMENT_PREFIX):
            continue  # the gateway's own deployment
        weights: dict[str, float] = {}
        running = 0
        for label, app in entry.get("versions", {}).items():
            version = label.partition(SHARD_SEPARATOR)[0]
            weights[version] = max(weights.get(version, 0.0), float(app["weight"]))
            running += int(app["running_replicas"])
        versions = tuple(sorted(weights.items(), key=lambda item: _version_order(item[0])))
        models.append(ServedModel(name.removeprefix(MODEL_DEPLOYMENT_PREFIX), versions, running))
    return sorted(models, key=lambda m: m.name)


def _version_order(version: str) -> tuple[int, str]:
    # "10" after "9": numeric versions by number, named ones after them by name
    return (int(version), "") if version.isdigit() else (1 << 62, version)


# ---- reading samples ----------------------------------------------------------------------


def select(samples: Samples, name: str, **match: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of each sample called ``name`` whose labels hold every ``match``."""
    for (sample_name, labels), value in samples.items():
        if sample_name != name:
            continue
        found = dict(labels)
        if all(found.get(key) == wanted for key, wanted in match.items()):
            yield found, value


def counter_growth(before: float | None, after: float) -> float:
    """How much a counter grew between two readings. A series absent before was born in
    between at 0 (prometheus_client makes a labelled series at its first increment); one
    that went down restarted from 0 (its process did), so all of ``after`` is new."""
    if before is None or after < before:
        return after
    return after - before


def _growth(
    previous: Samples | None, current: Samples, name: str, **match: str
) -> Iterator[tuple[dict[str, str], float]]:
    """Each matching series of ``current`` with what it grew since ``previous`` (all of its
    value with no previous scrape: the cumulative count since the series began)."""
    for labels, value in select(current, name, **match):
        if previous is None:
            yield labels, value
            continue
        before = previous.get((name, tuple(sorted(labels.items()))))
        yield labels, counter_growth(before, value)


def histogram_quantile(quantile: float, buckets: Mapping[float, float]) -> float | None:
    """PromQL's ``histogram_quantile`` over cumulative ``buckets`` (upper bound ``le`` ->
    count, ``math.inf`` included): linear interpolation inside the bucket the rank falls
    in, from 0 for the first; in the ``+Inf`` bucket, the largest finite bound. None with no
    observations or no ``+Inf`` bucket.

    Worked: {0.01: 2, 0.02: 8, inf: 10}, q=0.5 -> rank 5 falls in (0.01, 0.02] holding 6,
    3 of them needed: 0.01 + 0.01 * 3/6 = 0.015."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    counts: list[float] = []
    for bound in bounds:  # counts that went down (a reset between series) count as flat
        counts.append(max(buckets[bound], counts[-1] if counts else 0.0))
    total = counts[-1]
    if total <= 0:
        return None
    rank = quantile * total
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if bounds[index] == math.inf:
        return bounds[-2] if len(bounds) > 1 else None
    upper = bounds[index]
    if index == 0 and upper <= 0:
        return upper  # no lower bound to interpolate from
    lower, below = (bounds[index - 1], counts[index - 1]) if index > 0 else (0.0, 0.0)
    inside = counts[index] - below
    return upper if inside <= 0 else lower + (upper - lower) * (rank - below) / inside


# ---- one row ------------------------------------------------------------------------------


def requests_per_s(model: str, previous: Scrape | None, current: Scrape) -> float | None:
    """Gateway answers for ``model`` per second between two scrapes; None on the first."""
    if previous is None or current.taken_s <= previous.taken_s:
        return None
    grown = _growth(previous.gateway, current.gateway, "loom_requests_total", model=model)
    return sum(value for _, value in grown) / (current.taken_s - previous.taken_s)


def latency_quantiles_ms(
    model: str, previous: Scrape | None, current: Scrape, quantiles: Sequence[float]
) -> list[float | None]:
    """The gateway's request latency quantiles for ``model`` in ms, over the requests
    answered between two scrapes (every route summed per bucket), or since the start on the
    first frame. None for each when no request was answered in the window."""
    before = previous.gateway if previous is not None else None
    grown = _growth(before, current.gateway, "loom_request_duration_seconds_bucket", model=model)
    buckets: dict[float, float] = {}
    for labels, value in grown:
        bound = float(labels["le"])  # "+Inf" parses as inf
        buckets[bound] = buckets.get(bound, 0.0) + value
    seconds = [histogram_quantile(q, buckets) for q in quantiles]
    return [None if s is None else s * 1000.0 for s in seconds]


def running_replicas(model: ServedModel, scrape: Scrape) -> int:
    """Distinct replicas the sidecars report for the model; Serve's count without them."""
    replicas = {
        labels["replica"]
        for (_, raw), _value in scrape.sidecars.items()
        if (labels := dict(raw)).get("model") == model.name and labels.get("replica")
    }
    return len(replicas) if replicas else model.running_replicas


def desired_replicas(model: str, scrape: Scrape) -> int | None:
    """The autoscaler's desired replicas summed over the model's versions."""
    decisions = select(scrape.sidecars, "loom_autoscaler_desired_replicas", model=model)
    by_version = {labels.get("version", ""): value for labels, value in decisions}
    return round(sum(by_version.values())) if by_version else None


def queue_depth(model: str, scrape: Scrape) -> float | None:
    """Inputs admitted, not yet answered: the sum over the model's replicas (sidecar series,
    which carry ``replica``); else the gateway's merged gauge (one node, no sidecars)."""
    per_replica = [
        value
        for labels, value in select(scrape.sidecars, "loom_queue_depth", model=model)
        if labels.get("replica")
    ]
    if per_replica:
        return sum(per_replica)
    merged = [v for _, v in select(scrape.gateway, "loom_queue_depth", model=model)]
    return sum(merged) if merged else None


def node_gpu_utilization(scrape: Scrape) -> dict[str, float]:
    """Node -> mean ``loom_gpu_utilization_ratio`` over its GPUs (nodes with a GPU only)."""
    readings: dict[str, list[float]] = {}
    for labels, value in select(scrape.sidecars, "loom_gpu_utilization_ratio"):
        readings.setdefault(labels.get("node", ""), []).append(value)
    return {node: sum(values) / len(values) for node, values in readings.items()}


def gpu_utilization(model: str, scrape: Scrape, by_node: Mapping[str, float]) -> float | None:
    """Mean GPU use of the nodes hosting a replica of ``model``; None if none has a GPU."""
    nodes = {
        node
        for (_, raw), _value in scrape.sidecars.items()
        if (labels := dict(raw)).get("model") == model and (node := labels.get("node"))
    }
    values = [by_node[node] for node in sorted(nodes) if node in by_node]
    return sum(values) / len(values) if values else None


def build_rows(
    models: Iterable[ServedModel], previous: Scrape | None, current: Scrape
) -> list[ModelRow]:
    """One row per served model from two successive scrapes (``previous`` None on the
    first frame: no rates yet, latency from the cumulative buckets)."""
    by_node = node_gpu_utilization(current)
    rows = []
    for model in models:
        p50_ms, p95_ms = latency_quantiles_ms(model.name, previous, current, (0.5, 0.95))
        rows.append(
            ModelRow(
                model=model.name,
                versions=model.versions,
                running_replicas=running_replicas(model, current),
                desired_replicas=desired_replicas(model.name, current),
                requests_per_s=requests_per_s(model.name, previous, current),
                p50_ms=p50_ms,
                p95_ms=p95_ms,
                queue_depth=queue_depth(model.name, current),
                gpu_utilization_ratio=gpu_utilization(model.name, current, by_node),
            )
        )
    return rows


@dataclass(frozen=True)
class Frame:
    """What one round of reads found: None where a read failed, and why, for the footer."""

    models: list[ServedModel] | None
    scrape: Scrape | None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class TopState:
    """What the table shows between frames."""

    rows: tuple[ModelRow, ...] = ()
    previous: Scrape | None = None
    """The last complete scrape: the next frame's rates are measured from it."""
    stale: bool = False
    """The last frame failed: ``rows`` are an earlier frame's."""


def advance(state: TopState, frame: Frame) -> TopState:
    """The table after ``frame``: new rows when status and the gateway's metrics were both
    read; else the last rows, kept (and marked stale once there are any)."""
    if frame.models is None or frame.scrape is None:
        return replace(state, stale=bool(state.rows))
    rows = build_rows(frame.models, state.previous, frame.scrape)
    return TopState(rows=tuple(rows), previous=frame.scrape, stale=False)


# ---- text ---------------------------------------------------------------------------------

COLUMNS = ("MODEL", "VERSIONS", "RUN/DESIRED", "REQ/S", "P50 MS", "P95 MS", "QUEUE", "GPU")


def versions_cell(versions: Sequence[tuple[str, float]]) -> str:
    """``1`` for one version; with several, each with its share of traffic: ``1 90%, 2 10%``."""
    if len(versions) <= 1:
        return versions[0][0] if versions else NO_VALUE
    return ", ".join(f"{version} {weight * 100:.0f}%" for version, weight in versions)


def _number(value: float | None, decimals_below_10: int = 1) -> str:
    # 4.2 ms and 0.3 req/s keep a decimal; 123 ms does not need one
    if value is None:
        return NO_VALUE
    return f"{value:.{decimals_below_10}f}" if abs(value) < 10 else f"{value:.0f}"


def _whole(value: float | None) -> bool:
    return value is not None and value == int(value)


def row_cells(row: ModelRow) -> tuple[str, ...]:
    """The row as the table's text, in ``COLUMNS`` order."""
    running = NO_VALUE if row.running_replicas is None else str(row.running_replicas)
    desired = NO_VALUE if row.desired_replicas is None else str(row.desired_replicas)
    gpu = row.gpu_utilization_ratio
    return (
        row.model,
        versions_cell(row.versions),
        f"{running}/{desired}",
        _number(row.requests_per_s),
        _number(row.p50_ms),
        _number(row.p95_ms),
        _number(row.queue_depth, decimals_below_10=0 if _whole(row.queue_depth) else 1),
        NO_VALUE if gpu is None else f"{gpu * 100:.0f}%",
    )
