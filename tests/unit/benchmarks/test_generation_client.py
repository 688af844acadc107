"""The streaming completions client: HTTP heads, chunked bodies, server-sent events, usage.

No sockets: bodies are fed into an ``asyncio.StreamReader`` by hand.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks.generation_client import (
    CompletionStream,
    SseDecoder,
    StreamLoadConfig,
    _Collector,
    body_chunks,
    completion_body,
    completion_request,
    parse_head,
    run_stream_load,
    stream_one,
)
from benchmarks.generation_report import RequestTiming
from benchmarks.loadgen import ProtocolError


def _event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _text_chunk(text: str, finish_reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]}


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


class _Writer:
    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def test_completion_body_asks_for_a_greedy_stream_with_usage_ignoring_eos() -> None:
    body = json.loads(completion_body("tinygpt", "once upon", 64))
    assert body == {
        "model": "tinygpt", "prompt": "once upon", "max_tokens": 64, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip


def test_completion_request_carries_its_own_max_tokens_in_the_body() -> None:
    request = completion_request("tinygpt", "once upon", 40)
    assert request.max_tokens == 40
    assert json.loads(request.body)["max_tokens"] == 40
    assert json.loads(request.body)["ignore_eos"] is True


def test_a_request_is_short_against_its_own_max_tokens_only_when_sent_in_the_window() -> None:
    config = StreamLoadConfig(port=80, concurrency=2, warmup_s=0, duration_s=1)
    collector = _Collector(config, window_start_ns=100, window_end_ns=200)

    def answered(sent_ns: int, tokens: int) -> RequestTiming:
        return RequestTiming(sent_ns=sent_ns, first_token_ns=sent_ns + 1, done_ns=sent_ns + 2,
                             tokens=tokens)  # fmt: skip

    collector.success(answered(150, 40), max_tokens=40)  # made all 40 it asked for
    collector.success(answered(150, 64), max_tokens=96)  # 64 < 96: short
    collector.success(answered(150, 88), max_tokens=88)  # longer than the mean 64: not short
    collector.success(answered(50, 10), max_tokens=96)  # short, but sent in the warm-up
    assert (collector.short, len(collector.timings)) == (1, 4)


def test_run_stream_load_refuses_no_requests() -> None:
    config = StreamLoadConfig(port=80, concurrency=1, warmup_s=0, duration_s=1)
    with pytest.raises(ValueError, match="requests"):
        run_stream_load(config, [])


def test_parse_head_reads_status_framing_and_close_in_any_case() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\nConnection: close\r\n\r\n")
    assert (head.status, head.chunked, head.content_length, head.closes) == (200, True, None, True)
    head = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 22\r\n\r\n")
    assert (head.status, head.chunked, head.content_length, head.closes) == (404, False, 22, False)


def test_parse_head_refuses_what_is_not_http() -> None:
    with pytest.raises(ProtocolError, match="status line"):
        parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_sse_decoder_joins_events_cut_anywhere() -> None:
    decoder = SseDecoder()
    stream = b'data: {"a": 1}\r\n\r\n: keep-alive\n\ndata: [DO' + b"NE]\n\n"
    events = [e for i in range(0, len(stream), 5) for e in decoder.feed(stream[i : i + 5])]
    assert events == [b'{"a": 1}', b"[DONE]"]  # the comment makes no event


def test_sse_decoder_joins_the_data_lines_of_one_event() -> None:
    assert SseDecoder().feed(b"event: x\ndata: one\ndata:two\n\n") == [b"one\ntwo"]


def test_completion_stream_notes_first_text_usage_and_done() -> None:
    stream = CompletionStream()
    assert stream.feed(json.dumps(_text_chunk("")).encode()) is False  # empty text: not yet
    assert stream.feed(json.dumps(_text_chunk(" ba")).encode()) is True  # the first text
    assert stream.feed(json.dumps(_text_chunk("ko", "length")).encode()) is False
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 64}}
    stream.feed(json.dumps(usage).encode())
    stream.feed(b"[DONE]")
    assert (stream.text_chunks, stream.tokens, stream.finish_reason, stream.done) == (
        2, 64, "length", True,
    )  # fmt: skip


def test_completion_stream_counts_text_chunks_when_no_usage_comes() -> None:
    stream = CompletionStream()
    for text in ("a", "b", "c"):
        stream.feed(json.dumps(_text_chunk(text)).encode())
    assert stream.tokens == 3


def test_body_chunks_yields_each_chunk_as_it_comes_and_skips_the_trailer() -> None:
    async def collect() -> list[bytes]:
        reader = _reader(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
        head = parse_head(STREAM_HEAD)
        return [chunk async for chunk in body_chunks(reader, head)]

    assert asyncio.run(collect()) == [b"abc", b"de"]


def test_stream_one_reads_a_whole_completion_and_leaves_the_connection_at_the_next() -> None:
    body = _chunked(
        _event(_text_chunk(" ba")),
        _event(_text_chunk("ko", "length")) + _event({"choices": [], "usage": {
            "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
        _event("[DONE]"),
    )  # fmt: skip
    next_answer = b"HTTP/1.1 200 OK\r\n"

    async def exchange() -> tuple:
        reader, writer = _reader(STREAM_HEAD + body + next_answer), _Writer()
        head, stream, first_ns = await stream_one(reader, writer, b"POST ...")
        return head, stream, first_ns, writer.sent, await reader.read()

    head, stream, first_ns, sent, rest = asyncio.run(exchange())
    assert (head.status, stream.tokens, stream.done, stream.finish_reason) == (
        200,
        2,
        True,
        "length",
    )
    assert first_ns is not None
    assert sent == b"POST ..."
    assert rest == next_answer  # exactly one answer read off the connection


def test_stream_one_reads_off_an_error_body_without_parsing_it() -> None:
    async def exchange() -> tuple:
        answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
        return await stream_one(_reader(answer), _Writer(), b"POST ...")

    head, stream, first_ns = asyncio.run(exchange())
    assert (head.status, stream.done, first_ns) == (404, False, None)


def test_stream_load_config_refuses_a_target_other_than_localhost() -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        StreamLoadConfig(host="10.0.0.1", port=80, concurrency=1, warmup_s=0, duration_s=1)
