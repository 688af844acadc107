"""What the policy observes (issue 14, point 2): sidecar scrapes differenced over a window,
the p95 as Prometheus computes it, and Prometheus's query API answers, all from plain text."""

from __future__ import annotations

import json
import math
from urllib.parse import parse_qs, urlparse

import pytest

from serving.autoscaling.readings import (
    PrometheusReader,
    SidecarReader,
    parse_scrape,
    quantile,
    reading_between,
)


def sidecar_text(replicas: dict[str, tuple[str, float, float, dict[float, float]]]) -> str:
    """Prometheus text for replicas: id -> (app, depth-seconds, depth, cumulative buckets)."""
    lines = []
    for rid, (app, depth_s, depth, buckets) in replicas.items():
        labels = f'replica="{rid}",model="m",version="1",app="{app}",kind="rows",node="n"'
        lines.append(f"loom_queue_depth_seconds_total{{{labels}}} {depth_s}")
        lines.append(f"loom_queue_depth{{{labels}}} {depth}")
        for le, count in buckets.items():
            bound = "+Inf" if math.isinf(le) else repr(le)
            lines.append(
                f'loom_replica_request_duration_seconds_bucket{{{labels},le="{bound}"}} {count}'
            )
    return "\n".join(lines) + "\n"


INF = math.inf


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        # rank 95 of 100 lies 45/50 of the way through (0.01, 0.1]
        ({0.01: 50, 0.1: 100, INF: 100}, 0.95, 0.01 + 0.09 * 45 / 50),
        # everything in the first bucket: interpolated from 0
        ({0.01: 10, 0.1: 10, INF: 10}, 0.5, 0.005),
        # past the last finite bound: that bound, as histogram_quantile says
        ({0.01: 0, 0.1: 0, INF: 4}, 0.95, 0.1),
        ({0.01: 0, INF: 0}, 0.95, None),  # nothing observed
    ],
)
def test_quantile_interpolates_inside_the_bucket_like_prometheus(buckets, q, expected) -> None:
    got = quantile(q, buckets)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_queue_depth_is_the_window_mean_summed_over_replicas_seen_twice() -> None:
    old = parse_scrape(sidecar_text({"a": ("app", 10.0, 0, {}), "b": ("app", 0.0, 0, {})}))
    new = parse_scrape(
        sidecar_text(
            {
                "a": ("app", 30.0, 1, {}),  # 20 depth-seconds in 2 s: a mean depth of 10
                "b": ("app", 8.0, 9, {}),  # 8 in 2 s: 4
                "c": ("app", 0.0, 5, {}),  # new: its depth now stands for the window
                "x": ("other", 99.0, 99, {}),  # another app
            }
        )
    )
    reading = reading_between("app", old, new, 2.0, at_s=100.0)
    assert reading is not None
    assert reading.queue_depth == pytest.approx(10 + 4 + 5)
    assert reading.replicas == 3
    assert reading_between("gone", old, new, 2.0, at_s=100.0) is None


def test_p95_is_of_the_requests_answered_in_the_window_only() -> None:
    # before the window: 1000 slow requests; in it: 100 fast ones
    old = parse_scrape(sidecar_text({"a": ("app", 0, 0, {0.01: 0, 1.0: 1000, INF: 1000})}))
    new = parse_scrape(sidecar_text({"a": ("app", 0, 0, {0.01: 100, 1.0: 1100, INF: 1100})}))
    reading = reading_between("app", old, new, 1.0, at_s=0.0)
    assert reading is not None
    assert reading.latency_p95_ms is not None
    assert reading.latency_p95_ms == pytest.approx(0.0095 * 1000)  # 95/100 of (0, 10 ms]


def test_no_request_in_the_window_reads_as_no_latency_and_a_first_scrape_as_unknown() -> None:
    same = parse_scrape(sidecar_text({"a": ("app", 0, 0, {0.01: 5, INF: 5})}))
    idle = reading_between("app", same, same, 1.0, at_s=0.0)
    assert idle is not None
    assert idle.latency_p95_ms == 0.0
    first = reading_between("app", {}, same, 0.0, at_s=0.0)
    assert first is not None
    assert first.latency_p95_ms is None
    assert first.queue_depth == 0


def test_the_sidecar_reader_differences_over_its_window_and_skips_a_sidecar_down() -> None:
    now = [0.0]
    depth_seconds = [0.0]

    def fetch(url: str) -> str:
        if "down" in url:
            raise ConnectionRefusedError(url)
        return sidecar_text({"a": ("app", depth_seconds[0], 0, {})})

    reader = SidecarReader(
        lambda: ["up:1", "down:2"], window_s=2.0, fetch=fetch, clock=lambda: now[0]
    )
    for step in range(6):  # a constant depth of 3: 3 depth-seconds a second
        now[0], depth_seconds[0] = float(step), 3.0 * step
        readings = reader.read()
    assert readings["app"].queue_depth == pytest.approx(3.0)
    assert readings["app"].at_s == 5.0
    assert SidecarReader(lambda: ["down:1"], fetch=fetch).read() == {}  # nothing: missing


def test_the_prometheus_reader_asks_per_app_and_reads_nan_p95_without_requests_as_zero() -> None:
    answers = {
        "loom_queue_depth_seconds_total": {"loom.a@1": "12", "loom.b@2": "0"},
        "loom_replica_request_duration_seconds_count": {"loom.a@1": "40", "loom.b@2": "0"},
        "histogram_quantile": {"loom.a@1": "0.25", "loom.b@2": "NaN"},
        "loom_waiting_sequences": {},
        "loom_kv_cache_use_ratio": {},
        "count by": {"loom.a@1": "2", "loom.b@2": "1"},
    }
    asked: list[str] = []

    def fetch(url: str) -> str:
        assert url.startswith("http://prom:9090/api/v1/query?")
        promql = parse_qs(urlparse(url).query)["query"][0]
        asked.append(promql)
        key = next(k for k in answers if k in promql)
        result = [{"metric": {"app": app}, "value": [0, v]} for app, v in answers[key].items()]
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})

    readings = PrometheusReader(
        "http://prom:9090/", window_s=10, fetch=fetch, clock=lambda: 7.0
    ).read()

    assert readings["loom.a@1"].queue_depth == 12
    assert readings["loom.a@1"].latency_p95_ms == 250.0
    assert readings["loom.a@1"].replicas == 2
    assert readings["loom.b@2"].latency_p95_ms == 0.0  # no requests: NaN p95 is no latency
    assert readings["loom.b@2"].waiting_sequences is None
    assert all("[10s]" in q for q in asked if "rate(" in q)


def test_the_prometheus_reader_answers_nothing_when_prometheus_is_down() -> None:
    def fetch(url: str) -> str:
        raise ConnectionRefusedError(url)

    assert PrometheusReader("http://prom:9090", fetch=fetch).read() == {}
