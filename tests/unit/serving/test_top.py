"""``loom top``: the rows it computes from canned Prometheus text and ``/v1/status``
answers (``serving.top_view``), what a frame's reads make of failures (``serving.top``, with
a fake client), the key reader on a pseudo-terminal, and the command's options."""

from __future__ import annotations

import math
import os
import termios
from concurrent.futures import ThreadPoolExecutor

import pytest
from rich.console import Console

from loom.cli import build_parser
from serving.monitoring.targets import ScrapeTarget, sidecar_targets
from serving.top import FetchError, QuitKeys, read_frame, render
from serving.top_view import (
    MODEL_DEPLOYMENT_PREFIX,
    Frame,
    ModelRow,
    Scrape,
    ServedModel,
    TopState,
    advance,
    build_rows,
    counter_growth,
    histogram_quantile,
    parse_metrics,
    row_cells,
    served_models,
    versions_cell,
)

MINILM = ServedModel("minilm", (("1", 1.0),), running_replicas=2)

GATEWAY_T0 = """\
# TYPE loom_requests_total counter
loom_requests_total{model="minilm",route="embeddings",status="200"} 100
loom_requests_total{model="minilm",route="embeddings",status="503"} 4
loom_requests_total{model="",route="status",status="200"} 7
# TYPE loom_request_duration_seconds histogram
loom_request_duration_seconds_bucket{model="minilm",route="embeddings",le="0.01"} 80
loom_request_duration_seconds_bucket{model="minilm",route="embeddings",le="0.02"} 100
loom_request_duration_seconds_bucket{model="minilm",route="embeddings",le="+Inf"} 104
loom_request_duration_seconds_count{model="minilm",route="embeddings"} 104
loom_request_duration_seconds_sum{model="minilm",route="embeddings"} 1.2
# TYPE loom_queue_depth gauge
loom_queue_depth{model="minilm"} 3
"""

# 2 s later: 30 more 200s and 2 more 503s; the 32 new requests' latencies all fell in
# (0.01, 0.02] (the buckets grew 80->80, 100->132, 104->136), so this window is slower
# than the cumulative history
GATEWAY_T1 = """\
# TYPE loom_requests_total counter
loom_requests_total{model="minilm",route="embeddings",status="200"} 130
loom_requests_total{model="minilm",route="embeddings",status="503"} 6
loom_requests_total{model="",route="status",status="200"} 9
# TYPE loom_request_duration_seconds histogram
loom_request_duration_seconds_bucket{model="minilm",route="embeddings",le="0.01"} 80
loom_request_duration_seconds_bucket{model="minilm",route="embeddings",le="0.02"} 132
loom_request_duration_seconds_bucket{model="minilm",route="embeddings",le="+Inf"} 136
loom_request_duration_seconds_count{model="minilm",route="embeddings"} 136
loom_request_duration_seconds_sum{model="minilm",route="embeddings"} 1.8
"""


def _replica_labels(replica: str, node: str, version: str = "1", model: str = "minilm") -> str:
    return f'replica="{replica}",model="{model}",version="{version}",kind="rows",node="{node}"'


SIDECARS = f"""\
# TYPE loom_queue_depth gauge
loom_queue_depth{{{_replica_labels("r1", "a")}}} 4
loom_queue_depth{{{_replica_labels("r2", "a")}}} 1
loom_queue_depth{{{_replica_labels("r3", "b", version="2")}}} 2
# TYPE loom_in_flight gauge
loom_in_flight{{{_replica_labels("r1", "a")}}} 1
loom_in_flight{{{_replica_labels("g1", "c", model="tinygpt")}}} 1
# TYPE loom_autoscaler_desired_replicas gauge
loom_autoscaler_desired_replicas{{model="minilm",version="1"}} 3
loom_autoscaler_desired_replicas{{model="minilm",version="2"}} 1
# TYPE loom_gpu_utilization_ratio gauge
loom_gpu_utilization_ratio{{node="a",gpu="0",uuid="GPU-0"}} 0.5
loom_gpu_utilization_ratio{{node="a",gpu="1",uuid="GPU-1"}} 0.9
loom_gpu_utilization_ratio{{node="b",gpu="0",uuid="GPU-2"}} 0.2
"""


def scrape(taken_s: float, gateway: str, sidecars: str = "") -> Scrape:
    return Scrape(taken_s, parse_metrics(gateway), parse_metrics(sidecars))


# ---- arithmetic ---------------------------------------------------------------------------


def test_requests_per_second_is_the_counter_growth_over_the_seconds_between_scrapes() -> None:
    row = build_rows([MINILM], scrape(10.0, GATEWAY_T0), scrape(12.0, GATEWAY_T1))[0]
    # (130 - 100) + (6 - 4) = 32 answers in 12 - 10 = 2 s; the status route's model "" is
    # no model's
    assert row.requests_per_s == pytest.approx(32 / 2)


def test_latency_comes_from_the_bucket_growth_between_scrapes() -> None:
    row = build_rows([MINILM], scrape(10.0, GATEWAY_T0), scrape(12.0, GATEWAY_T1))[0]
    # window buckets {0.01: 0, 0.02: 32, inf: 32}: p50 rank 16 of the 32 in (0.01, 0.02]
    # -> 0.01 + 0.01 * 16/32 = 0.015 s; p95 rank 30.4 -> 0.01 + 0.01 * 30.4/32 = 0.0195 s
    assert row.p50_ms == pytest.approx(15.0)
    assert row.p95_ms == pytest.approx(19.5)


def test_the_first_frame_has_no_rate_and_takes_latency_from_the_cumulative_buckets() -> None:
    row = build_rows([MINILM], None, scrape(10.0, GATEWAY_T0))[0]
    assert row.requests_per_s is None
    # cumulative {0.01: 80, 0.02: 100, inf: 104}: p50 rank 52 of the 80 in (0, 0.01]
    # -> 0.01 * 52/80 = 0.0065 s; p95 rank 98.8 -> 0.01 + 0.01 * (98.8 - 80)/20 = 0.0194 s
    assert row.p50_ms == pytest.approx(6.5)
    assert row.p95_ms == pytest.approx(19.4)


def test_a_window_without_requests_has_no_latency() -> None:
    row = build_rows([MINILM], scrape(10.0, GATEWAY_T1), scrape(11.0, GATEWAY_T1))[0]
    assert row.requests_per_s == 0.0
    assert (row.p50_ms, row.p95_ms) == (None, None)


def test_a_counter_that_went_down_restarted_and_one_that_was_absent_was_born_at_zero() -> None:
    assert counter_growth(100.0, 130.0) == 30.0
    assert counter_growth(100.0, 5.0) == 5.0  # its process restarted: 0 -> 5 since
    assert counter_growth(None, 3.0) == 3.0  # first incremented between the scrapes


def test_histogram_quantile_interpolates_as_promql_does() -> None:
    buckets = {0.01: 2.0, 0.02: 8.0, math.inf: 10.0}
    # rank 0.5 * 10 = 5 falls in (0.01, 0.02] holding 8 - 2 = 6: 0.01 + 0.01 * (5 - 2)/6
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.015)
    # rank 0.1 * 10 = 1 falls in the first bucket, from 0: 0.01 * 1/2
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.005)
    # rank 9.5 falls in +Inf: the largest finite bound, as PromQL answers
    assert histogram_quantile(0.95, buckets) == 0.02
    assert histogram_quantile(0.5, {0.01: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {0.01: 3.0}) is None  # no +Inf bucket


def test_replicas_queue_and_gpu_come_from_the_sidecars_when_they_report() -> None:
    row = build_rows([MINILM], None, scrape(10.0, GATEWAY_T0, SIDECARS))[0]
    assert row.running_replicas == 3  # r1, r2, r3: not Serve's 2 from /v1/status
    assert row.desired_replicas == 3 + 1  # versions 1 and 2
    assert row.queue_depth == 4 + 1 + 2  # the replicas' sum, not the gateway's merged 3
    # nodes a (GPUs 0.5 and 0.9: 0.7) and b (0.2) host minilm: (0.7 + 0.2) / 2
    assert row.gpu_utilization_ratio == pytest.approx(0.45)


def test_a_model_on_a_node_without_a_gpu_shows_no_gpu_and_no_decision() -> None:
    tinygpt = ServedModel("tinygpt", (("1", 1.0),), running_replicas=1)
    row = build_rows([tinygpt], None, scrape(10.0, "", SIDECARS))[0]
    assert row.running_replicas == 1  # g1
    assert row.gpu_utilization_ratio is None  # node c reports no GPU
    assert row.desired_replicas is None
    assert row.queue_depth is None


def test_without_sidecars_replicas_come_from_status_and_queue_depth_from_the_gateway() -> None:
    row = build_rows([MINILM], None, scrape(10.0, GATEWAY_T0))[0]
    assert row.running_replicas == 2
    assert row.queue_depth == 3
    assert (row.desired_replicas, row.gpu_utilization_ratio) == (None, None)


def test_parse_metrics_leaves_out_created_samples_and_refuses_what_is_not_exposition() -> None:
    text = '# TYPE c counter\nc_total{m="x"} 2\nc_created{m="x"} 1.7e9\n'
    assert parse_metrics(text) == {("c_total", (("m", "x"),)): 2.0}
    with pytest.raises(ValueError, match="invalid metric name"):
        parse_metrics("<html>404</html>")


# ---- /v1/status and service discovery -----------------------------------------------------


def _app(weight: float, running: int) -> dict[str, object]:
    return {"status": "RUNNING", "running_replicas": running, "weight": weight}


def test_served_models_fold_shards_into_versions_and_skip_the_gateway() -> None:
    status = {
        "application": "RUNNING",
        "deployments": {
            "Gateway": {"status": "HEALTHY", "running_replicas": 1},
            "model-pool": {"versions": {"1~0": _app(1.0, 1), "1~1": _app(1.0, 2)}},
            "model-minilm": {"versions": {"10": _app(0.1, 1), "9": _app(0.9, 2)}},
        },
    }
    assert served_models(status) == [
        ServedModel("minilm", (("9", 0.9), ("10", 0.1)), running_replicas=1 + 2),
        ServedModel("pool", (("1", 1.0),), running_replicas=1 + 2),
    ]


def test_the_status_prefix_is_the_deployments_own() -> None:
    from serving.replicas.deployment import DEPLOYMENT_PREFIX

    assert MODEL_DEPLOYMENT_PREFIX == DEPLOYMENT_PREFIX


def test_sidecar_targets_follow_prometheus_scheme_and_path_labels() -> None:
    answer = [
        {"targets": ["10.0.0.1:9400", "10.0.0.2:9400"], "labels": {"job": "loom-sidecar"}},
        {
            "targets": ["10.0.0.3:9443"],
            "labels": {"job": "loom-sidecar", "node": "n3", "__scheme__": "https"},
        },
        {"targets": ["127.0.0.1:8000"], "labels": {"job": "loom-gateway"}},
    ]
    assert sidecar_targets(answer) == [
        ScrapeTarget("http://10.0.0.1:9400/metrics", ""),
        ScrapeTarget("http://10.0.0.2:9400/metrics", ""),
        ScrapeTarget("https://10.0.0.3:9443/metrics", "n3"),
    ]
    for wrong in ({"targets": []}, [{"labels": {}}], [{"targets": ["h:1"], "labels": []}]):
        with pytest.raises(ValueError, match="target"):
            sidecar_targets(wrong)


# ---- cells --------------------------------------------------------------------------------


def test_cells_show_a_dash_where_no_source_has_the_value() -> None:
    row = ModelRow("minilm", (("1", 1.0),), 2, None, None, 4.25, 123.4, 3.0, None)
    assert row_cells(row) == ("minilm", "1", "2/-", "-", "4.2", "123", "3", "-")
    busy = ModelRow("tinygpt", (), 1, 4, 0.5, None, None, 2.5, 0.456)
    assert row_cells(busy) == ("tinygpt", "-", "1/4", "0.5", "-", "-", "2.5", "46%")


def test_several_versions_show_their_share_of_traffic() -> None:
    assert versions_cell((("1", 0.9), ("2", 0.1))) == "1 90%, 2 10%"
    assert versions_cell((("3", 1.0),)) == "3"


def test_the_table_shows_a_model_name_as_text_not_markup() -> None:
    row = ModelRow("[bold]x", (("1", 1.0),), 1, None, None, None, None, None, None)
    console = Console(record=True, width=160)
    console.print(render([row], ["updated 12:00:00"], "http://127.0.0.1:8000"))
    text = console.export_text()
    assert "[bold]x" in text
    assert "RUN/DESIRED" in text
    assert "updated 12:00:00" in text


# ---- frames: what failures leave on the table ----------------------------------------------


class FakeServer:
    """Answers ``read`` from a table of URL -> body; a URL it lacks answers 404, a body that
    is an exception is raised (an unreachable sidecar)."""

    def __init__(self, answers: dict[str, bytes | FetchError]) -> None:
        self.answers = answers
        self.keys_sent: dict[str, bool] = {}

    def read(self, url: str, *, send_key: bool = True) -> bytes:
        self.keys_sent[url] = send_key
        answer = self.answers.get(url, FetchError(f"{url} answered 404"))
        if isinstance(answer, FetchError):
            raise answer
        return answer


STATUS = b'{"application": "RUNNING", "deployments": {"model-minilm": {"versions": {"1": {"status": "RUNNING", "running_replicas": 2, "weight": 1.0}}}}}'  # noqa: E501


def _frame(answers: dict[str, bytes | FetchError]) -> tuple[Frame, FakeServer]:
    server = FakeServer(answers)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return read_frame(server, pool), server


def test_without_a_targets_route_the_frame_has_no_sidecars_and_says_so() -> None:
    frame, _ = _frame({"/v1/status": STATUS, "/metrics": GATEWAY_T0.encode()})
    assert frame.models == [MINILM]
    assert frame.scrape is not None
    assert frame.scrape.sidecars == {}
    assert frame.problems == ("no sidecars: /v1/admin/targets answered 404",)
    row = advance(TopState(), frame).rows[0]
    assert (row.gpu_utilization_ratio, row.desired_replicas) == (None, None)


def test_an_unreachable_sidecar_is_a_footer_line_and_the_others_still_count() -> None:
    targets = b'[{"targets": ["a:9400", "b:9400"], "labels": {"job": "loom-sidecar", "node": "a"}}]'
    frame, server = _frame(
        {
            "/v1/status": STATUS,
            "/metrics": GATEWAY_T0.encode(),
            "/v1/admin/targets": targets,
            "http://a:9400/metrics": SIDECARS.encode(),
            "http://b:9400/metrics": FetchError("http://b:9400/metrics: connection refused"),
        }
    )
    assert frame.problems == ("sidecar a: http://b:9400/metrics: connection refused",)
    assert advance(TopState(), frame).rows[0].queue_depth == 4 + 1 + 2
    assert server.keys_sent["/v1/admin/targets"] is True
    assert server.keys_sent["http://a:9400/metrics"] is False  # the key stays with the gateway


def test_a_failed_frame_keeps_the_last_rows_and_marks_them_stale() -> None:
    good, _ = _frame({"/v1/status": STATUS, "/metrics": GATEWAY_T0.encode()})
    shown = advance(TopState(), good)
    failed, _ = _frame({"/v1/status": STATUS})  # /metrics answers 404
    after = advance(shown, failed)
    assert after.rows == shown.rows
    assert after.previous is shown.previous  # the next rate is measured from the good one
    assert after.stale
    assert "/metrics answered 404" in failed.problems
    assert not advance(TopState(), failed).stale  # nothing shown yet: nothing is stale


# ---- the terminal and the command ---------------------------------------------------------


def test_quit_keys_see_q_without_enter_and_restore_the_terminal() -> None:
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "r", closefd=False) as stream:
            before = termios.tcgetattr(follower)
            with QuitKeys(stream) as keys:
                assert not termios.tcgetattr(follower)[3] & termios.ICANON  # cbreak
                assert keys.quit_pressed(0.01) is False
                os.write(leader, b"x")
                assert keys.quit_pressed(0.01) is False
                os.write(leader, b"q")  # no newline: cbreak delivers the key alone
                assert keys.quit_pressed(10.0) is True
            assert termios.tcgetattr(follower) == before
    finally:
        os.close(leader)
        os.close(follower)


def test_loom_top_takes_the_status_options_and_refuses_a_zero_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["top", "--url", "https://h:1", "--cacert", "ca.pem"])
    assert (args.url, args.cacert, args.interval_s) == ("https://h:1", "ca.pem", 1.0)
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["top", "--interval-s", "0"])
    assert refused.value.code == 2
    assert "above 0" in capsys.readouterr().err
