"""Command-line parsing, the corpus, batch slicing, HTTP framing and child environments."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.corpus import SENTENCES, request_bodies, take_cycled
from benchmarks.engine_sweep import batch_at
from benchmarks.loadgen import LoadConfig, ProtocolError, build_requests, read_response
from benchmarks.options import parse_env_assignments, parse_int_list
from benchmarks.processes import child_env


def test_parse_int_list_keeps_order_and_drops_duplicates() -> None:
    assert parse_int_list("1, 8,32,8,64") == (1, 8, 32, 64)


@pytest.mark.parametrize("text", ["", "1,x", "0,8", "-1"])
def test_parse_int_list_refuses_empty_non_integer_and_below_one(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        parse_int_list(text)


def test_parse_env_assignments_splits_on_the_first_equals_sign() -> None:
    env = parse_env_assignments(["RAY_SERVE_A=1", "B=x=y", "C=", "RAY_SERVE_A=2"])
    assert env == {"RAY_SERVE_A": "2", "B": "x=y", "C": ""}  # the last A wins


@pytest.mark.parametrize("assignment", ["NOEQUALS", "=1", "1A=2", "A B=1"])
def test_parse_env_assignments_refuses_what_is_not_key_equals_value(assignment: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_env_assignments([assignment])


def test_corpus_sentences_are_short_and_distinct() -> None:
    assert len(SENTENCES) == 64
    assert len(set(SENTENCES)) == 64
    assert all(5 <= len(s.split()) <= 12 for s in SENTENCES)


def test_take_cycled_starts_over_after_the_last_sentence() -> None:
    texts = take_cycled(66)
    assert texts[:64] == list(SENTENCES)
    assert texts[64:] == [SENTENCES[0], SENTENCES[1]]


def test_request_bodies_are_openai_embedding_requests() -> None:
    assert request_bodies(["Hi there."], model="minilm") == [
        b'{"model": "minilm", "input": "Hi there."}'
    ]


def test_batch_at_walks_the_texts_cyclically() -> None:
    texts = [str(i) for i in range(10)]
    assert batch_at(texts, 4, 0) == ["0", "1", "2", "3"]
    assert batch_at(texts, 4, 2) == ["8", "9", "0", "1"]  # starts at 2 * 4 = 8, wraps


def test_build_requests_frames_each_body_with_its_length() -> None:
    (request,) = build_requests("127.0.0.1", 8000, "/v1/embeddings", [b'{"a":1}'])
    assert request.startswith(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert request.endswith(b'Content-Length: 7\r\n\r\n{"a":1}')


def test_load_config_refuses_a_target_other_than_localhost() -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        LoadConfig(host="10.0.0.1", port=80, path="/", concurrency=1, warmup_s=0, duration_s=1)


def _read(data: bytes) -> tuple[tuple[int, bool], bytes]:
    """Frame one answer from ``data``; returns the result and what is left unread."""

    async def go() -> tuple[tuple[int, bool], bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        result = await read_response(reader)
        return result, await reader.read()

    return asyncio.run(go())


def test_read_response_consumes_exactly_a_content_length_body() -> None:
    answer = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}'
    result, rest = _read(answer + b"HTTP/1.1 ...")
    assert result == (200, False)
    assert rest == b"HTTP/1.1 ..."  # the next answer is left for the next read


def test_read_response_consumes_a_chunked_body_and_its_trailer() -> None:
    answer = b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    result, rest = _read(answer + b"NEXT")
    assert result == (429, False)
    assert rest == b"NEXT"


def test_read_response_reports_that_the_server_will_close() -> None:
    result, _ = _read(b"HTTP/1.1 503 Busy\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
    assert result == (503, True)


def test_read_response_refuses_a_body_without_framing() -> None:
    with pytest.raises(ProtocolError, match="neither"):
        _read(b"HTTP/1.1 200 OK\r\n\r\nbody until close")


def test_child_env_drops_inherited_loom_settings_and_adds_overrides() -> None:
    inherited = {"PATH": "/bin", "LOOM_API_KEYS": "k", "LOOM_CONFIG": "x.yaml"}
    env = child_env({"LOOM_HOME": "/tmp/h", "RAY_SERVE_X": "1"}, environ=inherited)
    assert env == {"PATH": "/bin", "LOOM_HOME": "/tmp/h", "RAY_SERVE_X": "1"}


def test_variants_parse_labels_and_their_environments():
    from benchmarks.options import parse_variants

    assert parse_variants(["ha:A=1,B=2", "plain:"]) == {"ha": {"A": "1", "B": "2"}, "plain": {}}
    with pytest.raises(ValueError, match="LABEL"):
        parse_variants(["A=1"])


def test_variants_carry_model_config_overrides_with_yaml_types():
    from benchmarks.options import parse_variants, split_variant
    from benchmarks.setups import stack_config

    variants = parse_variants(["one:model.replicas=1,model.torch_threads=2,RAY_X=1"])
    env, model = split_variant(variants["one"])
    assert env == {"RAY_X": "1"}
    assert model == {"replicas": 1, "torch_threads": 2}
    config = stack_config(port=1, model_name="m", num_cpus=4, model_overrides=model)
    assert (config["models"][0]["replicas"], config["models"][0]["torch_threads"]) == (1, 2)
    assert stack_config(port=1, model_name="m", num_cpus=4)["models"][0]["replicas"] == 4
    with pytest.raises(ValueError, match="model.FIELD"):
        parse_variants(["bad:model.=3"])
