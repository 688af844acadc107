"""The replica -> sidecar interface (issue 14, point 1): a replica's stats file, the adapters
that name its series, and a real sidecar serving them over HTTP, all without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.monitoring.adapters import cumulative_buckets
from serving.monitoring.sidecar import Sidecar, SidecarSettings
from serving.monitoring.stats import (
    Histogram,
    ReplicaStats,
    StatsReporter,
    read_stats_dir,
    stats_path,
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [
        v
        for (n, have), v in samples(text).items()
        if n == name and set(labels.items()) <= set(have)
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    running = Sidecar(SidecarSettings(stats_dir=tmp_path / "stats", port=0, node="n1"))
    running.start()
    yield running
    running.stop()


def scrape(sidecar: Sidecar) -> str:
    with urllib.request.urlopen(f"http://{sidecar.address}/metrics", timeout=10) as answer:
        return answer.read().decode()


def test_a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() -> None:
    histogram = Histogram((1, 2, 4))
    for v in (0.5, 1.0, 1.5, 4.0, 9.0):
        histogram.observe(v)
    # le is inclusive: 1.0 goes in "1", 4.0 in "4"; 9.0 in +Inf
    assert histogram.counts == [2, 1, 1, 1]
    assert (histogram.count, histogram.sum) == (5, 16.0)
    assert cumulative_buckets(histogram.as_json()) == [
        ("1.0", 2), ("2.0", 3), ("4.0", 4), ("+Inf", 5)
    ]  # fmt: skip


def test_the_queue_depth_integral_gives_the_mean_depth_over_time() -> None:
    stats = ReplicaStats(replica="r1", kind="rows")
    model = stats.model("m", "1")
    model.enter(4, requests=1)
    time.sleep(0.2)
    model.leave(4, requests=1)
    first = stats.snapshot()["models"][0]
    # 4 queued for >= 0.2 s, then 0: >= 0.8 queue-depth-seconds, and depth 0 now
    assert first["counters"]["queue_depth_seconds"] >= 4 * 0.2 - 1e-9
    assert first["gauges"]["queue_depth"] == 0


def test_a_call_of_three_requests_counts_three_in_flight_and_three_latencies() -> None:
    model = ReplicaStats(replica="r1", kind="rows").model("m", "1")
    model.enter(12, requests=3)  # a joined call: 3 requests, 12 inputs
    assert (model.gauges["in_flight"], model.as_json()["gauges"]["queue_depth"]) == (3, 12)
    model.leave(12, requests=3, seconds=0.02)
    histogram = model.histograms["request_seconds"]
    assert (model.gauges["in_flight"], histogram.count) == (0, 3)
    assert histogram.sum == pytest.approx(3 * 0.02)


def test_a_reporter_writes_the_file_at_once_and_removes_it_when_closed(tmp_path: Path) -> None:
    stats = ReplicaStats(replica="r1", kind="rows", app="loom.m@1")
    stats.model("m", "1").inc("inputs", 3)
    reporter = StatsReporter(stats, tmp_path, interval_s=60)
    [found] = list(read_stats_dir(tmp_path))
    assert found.document["models"][0]["counters"]["inputs"] == 3
    assert found.pid == os.getpid()
    reporter.close()
    assert list(read_stats_dir(tmp_path)) == []


def test_the_sidecar_serves_every_replica_under_loom_names_with_its_labels(
    sidecar: Sidecar,
) -> None:
    rows = ReplicaStats(replica="r-rows", kind="rows", app="loom.minilm@3")
    minilm = rows.model("minilm", "3")
    minilm.inc("inputs", 96)
    minilm.observe("batch_size", 32)
    minilm.set("max_batch_size", 64)
    gen = ReplicaStats(replica="r-gen", kind="generate", app="loom.tiny@1")
    tiny = gen.model("tiny", "1")
    tiny.set("waiting", 3)
    tiny.set("kv_cache_use", 0.25)
    tiny.inc("tokens", 40)
    tiny.inc("secret_internal_counter", 1)  # not in the adapter: not exported
    for stats in (rows, gen):
        StatsReporter(stats, sidecar.settings.stats_dir, interval_s=60)

    text = scrape(sidecar)
    labels = {"replica": "r-rows", "model": "minilm", "version": "3", "app": "loom.minilm@3"}
    assert value(text, "loom_inputs_total", **labels, kind="rows", node="n1") == 96
    assert value(text, "loom_batch_size_count", **labels) == 1
    assert value(text, "loom_batch_size_bucket", **labels, le="32.0") == 1
    assert value(text, "loom_max_batch_size", **labels) == 64
    assert value(text, "loom_waiting_sequences", replica="r-gen", kind="generate") == 3
    assert value(text, "loom_kv_cache_use_ratio", replica="r-gen") == 0.25
    assert value(text, "loom_generated_tokens_total", replica="r-gen") == 40
    assert "secret_internal_counter" not in text
    # this process wrote both files: its CPU and memory are exported per replica
    assert value(text, "loom_replica_memory_bytes", replica="r-gen") > 0
    assert value(text, "loom_sidecar_replicas", node="n1") == 2
    # no GPU here: the GPU series are absent, not zero
    assert "loom_gpu_utilization_ratio" not in text


def test_the_file_of_a_killed_replica_is_dropped_at_the_next_scrape(sidecar: Sidecar) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(child.stdout)  # that process has exited
    stats = ReplicaStats(replica="r-killed", kind="rows")
    stats.model("m", "1").inc("inputs", 1)
    document = {**stats.snapshot(), "pid": dead_pid}
    path = stats_path(sidecar.settings.stats_dir, "r-killed")
    path.write_text(json.dumps(document))

    text = scrape(sidecar)

    assert "r-killed" not in text
    assert not path.exists()


def test_the_autoscalers_decision_is_exported_with_its_deciding_signal(sidecar: Sidecar) -> None:
    document = {
        "schema": 1,
        "kind": "autoscaler",
        "replica": "autoscaler-loom.m@1",
        "app": "loom.m@1",
        "written_s": time.time(),
        "models": [
            {
                "model": "m",
                "version": "1",
                "gauges": {"desired_replicas": 3, "current_replicas": 1},
                "signals": {"queue_depth": 24.0, "latency_p95_ms": None},
                "deciding": "queue_depth",
            }
        ],
    }
    path = stats_path(sidecar.settings.stats_dir, "autoscaler-loom.m@1")
    path.write_text(json.dumps(document))

    text = scrape(sidecar)

    assert value(text, "loom_autoscaler_desired_replicas", model="m", app="loom.m@1") == 3
    assert value(text, "loom_autoscaler_current_replicas", model="m") == 1
    assert value(text, "loom_autoscaler_signal", signal="queue_depth") == 24.0
    assert value(text, "loom_autoscaler_deciding_signal", signal="queue_depth") == 1
    assert value(text, "loom_autoscaler_deciding_signal", signal="latency_p95_ms") == 0


def test_a_malformed_stats_file_costs_its_own_series_not_the_scrape(sidecar: Sidecar) -> None:
    good = ReplicaStats(replica="r-good", kind="rows", app="loom.m@1")
    good.model("m", "1").inc("inputs", 5)
    StatsReporter(good, sidecar.settings.stats_dir, interval_s=60)
    broken = {**good.snapshot(), "replica": "r-broken", "models": [{"version": "1"}]}
    stats_path(sidecar.settings.stats_dir, "r-broken").write_text(json.dumps(broken))

    text = scrape(sidecar)  # answered, not a 500

    assert value(text, "loom_inputs_total", replica="r-good") == 5
    assert value(text, "loom_sidecar_replicas", node="n1") == 1  # the good one only
