"""A closed-loop client for streaming OpenAI completions, light enough to share two cores with
the server it drives.

C virtual users each hold one keep-alive HTTP/1.1 connection, send a prebuilt
``POST /v1/completions`` with ``"stream": true`` and read the server-sent events as they
arrive: TTFT is send to the first chunk with non-empty text, the request ends at
``data: [DONE]``, and the final chunk's ``usage.completion_tokens`` says how many tokens it
made (fewer than that request's own ``max_tokens``: ``short``). Users send back to back
until the window closes; the requests still streaming then are read to their end, so tokens
in the window can be counted by overlap (``generation_report.tokens_in_window``).

The HTTP is the same minimal client as ``loadgen`` (asyncio streams, uvloop when installed),
reading a chunked body chunk by chunk instead of discarding it. Only 127.0.0.1 is a target.

    requests = [completion_request("tinygpt", "Once upon", 64), ...]
    config = StreamLoadConfig(port=8000, concurrency=8, warmup_s=5, duration_s=20)
    result = run_stream_load(config, requests)   # blocks for warmup_s + duration_s + drain
    figures = window_figures(result.timings, result.window_start_ns, result.window_end_ns)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import orjson

from benchmarks.generation_report import RequestTiming, closed_loop_offsets
from benchmarks.loadgen import (
    LOCALHOST,
    ProtocolError,
    build_requests,
    drive_window,
    event_loop_factory,
)

NS_PER_S = 1_000_000_000
COMPLETIONS_PATH = "/v1/completions"


def completion_body(model: str, prompt: str, max_tokens: int, logprobs: int | None = None) -> bytes:
    """A streaming, greedy completion request that always makes ``max_tokens`` tokens
    (``logprobs``: with each token's logprob and that many alternatives)."""
    body: dict[str, object] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if logprobs is not None:
        body["logprobs"] = logprobs
    return orjson.dumps(body)


@dataclass(frozen=True)
class CompletionRequest:
    """One prebuilt request body and the tokens it asks for."""

    body: bytes
    max_tokens: int
    """An answer with fewer tokens than this counts as ``short``."""


def completion_request(
    model: str, prompt: str, max_tokens: int, logprobs: int | None = None
) -> CompletionRequest:
    return CompletionRequest(completion_body(model, prompt, max_tokens, logprobs), max_tokens)


@dataclass(frozen=True, kw_only=True)
class ResponseHead:
    """What the client needs of an HTTP/1.1 status line and headers."""

    status: int
    content_length: int | None
    chunked: bool
    closes: bool
    """The server will close the connection after this answer."""


def parse_head(head: bytes) -> ResponseHead:
    """Parse ``HTTP/1.1 200 OK\\r\\n...\\r\\n\\r\\n``; header names are case-insensitive."""
    if not head.startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x status line: {head[:40]!r}")
    status = int(head[9:12])  # b"HTTP/1.1 200 OK": the code is bytes 9..11
    length, chunked, closes = None, False, False
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            closes = value == b"close"
    return ResponseHead(status=status, content_length=length, chunked=chunked, closes=closes)


class SseDecoder:
    """Server-sent events from body bytes cut anywhere: ``feed`` returns the ``data`` of each
    event completed so far (several ``data:`` lines of one event joined by ``\\n``)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            line = line.removesuffix(b"\r")
            if not line:  # a blank line ends the event
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[5:].removeprefix(b" "))
            # comments (":keep-alive"), event:, id: and retry: lines carry nothing needed here
        return events


@dataclass
class CompletionStream:
    """The state of one streamed completion, fed one SSE ``data`` payload at a time."""

    text_chunks: int = 0
    """Chunks with non-empty ``choices[0].text``."""
    completion_tokens: int | None = None
    """From the final chunk's ``usage``, when the server sends it."""
    finish_reason: str | None = None
    done: bool = False

    def feed(self, payload: bytes) -> bool:
        """Take one payload; returns True if it carried the stream's first text."""
        if payload == b"[DONE]":
            self.done = True
            return False
        chunk = orjson.loads(payload)
        usage = chunk.get("usage")
        if usage:
            self.completion_tokens = usage.get("completion_tokens")
        choices = chunk.get("choices") or ()
        if not choices:
            return False
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if choice.get("text"):
            self.text_chunks += 1
            return self.text_chunks == 1
        return False

    @property
    def tokens(self) -> int:
        """Tokens made: ``usage`` when sent, else one per text chunk."""
        return self.completion_tokens if self.completion_tokens is not None else self.text_chunks


async def body_chunks(
    reader: asyncio.StreamReader, head: ResponseHead, max_chunks: int = 1_000_000
) -> AsyncIterator[bytes]:
    """The answer's body as it arrives: chunk by chunk when chunked, else by Content-Length,
    else to the end of the connection."""
    if head.chunked:
        for _ in range(max_chunks):
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer lines, up to the empty one
                return
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            yield data[:-2]
        raise ProtocolError(f"more than {max_chunks} chunks")
    if head.content_length is not None:
        if head.content_length:
            yield await reader.readexactly(head.content_length)
        return
    while data := await reader.read(65536):
        yield data


@dataclass(frozen=True, kw_only=True)
class StreamLoadConfig:
    """One closed-loop level against ``http://127.0.0.1:{port}/v1/completions``."""

    port: int
    concurrency: int
    warmup_s: float
    """Load runs this long before the window opens."""
    duration_s: float
    """Length of the measured window."""
    path: str = COMPLETIONS_PATH
    host: str = LOCALHOST
    drain_timeout_s: float = 120.0
    """After the window closes, requests still streaming get this long to end."""
    reconnect_backoff_s: float = 0.05
    max_errors_per_user: int = 1_000

    def __post_init__(self) -> None:
        if self.host != LOCALHOST:
            raise ValueError(f"the client targets {LOCALHOST} only, got {self.host!r}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.warmup_s < 0 or self.duration_s <= 0:
            raise ValueError("warmup_s must be >= 0 and duration_s > 0")


@dataclass(kw_only=True)
class StreamLoadResult:
    """Every request that ended well (warm-up and drain included: the report picks by time),
    and the failures inside the window."""

    concurrency: int
    window_start_ns: int
    window_end_ns: int
    timings: list[RequestTiming]
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    short: int = 0
    """Requests sent in the window that made fewer tokens than their own ``max_tokens``."""
    loadgen_cpu_s: float = 0.0
    """CPU time this process used during the window."""


class _Collector:
    """Shared by one level's users; one event loop thread, so no locks."""

    def __init__(self, config: StreamLoadConfig, window_start_ns: int, window_end_ns: int) -> None:
        self.config = config
        self.window_start_ns, self.window_end_ns = window_start_ns, window_end_ns
        self.timings: list[RequestTiming] = []
        self.errors = 0
        self.short = 0
        self.error_kinds: Counter[str] = Counter()

    def success(self, timing: RequestTiming, max_tokens: int) -> None:
        """A complete answer to a request that asked for ``max_tokens``."""
        self.timings.append(timing)
        sent_inside = self.window_start_ns <= timing.sent_ns < self.window_end_ns
        if sent_inside and timing.tokens < max_tokens:
            self.short += 1

    def failure(self, at_ns: int, kind: str) -> None:
        if self.window_start_ns <= at_ns <= self.window_end_ns:
            self.errors += 1
            self.error_kinds[kind] += 1


async def stream_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[ResponseHead, CompletionStream, int | None]:
    """Send one request and read its event stream to the end; returns the head, the stream's
    state and when its first text arrived (``perf_counter_ns``; ``None`` if none did)."""
    writer.write(request)
    head = parse_head(await reader.readuntil(b"\r\n\r\n"))
    stream, decoder, first_ns = CompletionStream(), SseDecoder(), None
    async for chunk in body_chunks(reader, head):
        if head.status != 200:
            continue  # an error body: read it off the connection, no more
        for payload in decoder.feed(chunk):
            if stream.feed(payload) and first_ns is None:
                first_ns = time.perf_counter_ns()
    return head, stream, first_ns


async def _user(
    config: StreamLoadConfig,
    requests: Sequence[CompletionRequest],
    messages: Sequence[bytes],
    offset: int,
    collector: _Collector,
) -> None:
    """One virtual user: send, read the stream to [DONE], send the next, until the window
    closes. ``messages[i]`` is ``requests[i]`` as HTTP bytes."""
    reader = writer = None
    errors = 0
    index = offset
    try:
        while time.perf_counter_ns() < collector.window_end_ns:
            sent_ns = time.perf_counter_ns()
            try:
                if reader is None or writer is None:
                    reader, writer = await asyncio.open_connection(config.host, config.port)
                head, stream, first_ns = await stream_one(
                    reader, writer, messages[index % len(messages)]
                )
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ProtocolError,
                ValueError,
            ) as exc:
                collector.failure(time.perf_counter_ns(), type(exc).__name__)
                await _close(writer)
                reader = writer = None
                errors += 1
                if errors > config.max_errors_per_user:
                    return
                await asyncio.sleep(config.reconnect_backoff_s)
                continue
            done_ns = time.perf_counter_ns()
            request = requests[index % len(requests)]
            index += 1
            if head.closes or head.status != 200:  # after an error, trust a new connection
                await _close(writer)
                reader = writer = None
            if head.status != 200:
                collector.failure(done_ns, f"http_{head.status}")
                await asyncio.sleep(config.reconnect_backoff_s)  # no hot loop on 404/503
            elif not stream.done or first_ns is None:
                collector.failure(done_ns, "no_done" if not stream.done else "no_text")
            else:
                collector.success(
                    RequestTiming(
                        sent_ns=sent_ns,
                        first_token_ns=first_ns,
                        done_ns=done_ns,
                        tokens=stream.tokens,
                    ),
                    request.max_tokens,
                )
    finally:
        await _close(writer)


async def _close(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer`` if there is one; the caller then sets its own to None."""
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _run_level(
    config: StreamLoadConfig, requests: Sequence[CompletionRequest], messages: Sequence[bytes]
) -> StreamLoadResult:
    now_ns = time.perf_counter_ns()
    window_start_ns = now_ns + int(config.warmup_s * NS_PER_S)
    window_end_ns = window_start_ns + int(config.duration_s * NS_PER_S)
    collector = _Collector(config, window_start_ns, window_end_ns)
    # users start at different prompts so concurrent requests carry different lengths
    users = [
        asyncio.create_task(_user(config, requests, messages, offset, collector))
        for offset in closed_loop_offsets(len(requests), config.concurrency)
    ]
    cpu_s = await drive_window(
        users,
        window_start_ns=window_start_ns,
        window_end_ns=window_end_ns,
        drain_timeout_s=config.drain_timeout_s,
    )
    return StreamLoadResult(
        concurrency=config.concurrency,
        window_start_ns=window_start_ns,
        window_end_ns=window_end_ns,
        timings=collector.timings,
        errors=collector.errors,
        error_kinds=dict(collector.error_kinds),
        short=collector.short,
        loadgen_cpu_s=cpu_s,
    )


def run_stream_load(
    config: StreamLoadConfig, requests: Sequence[CompletionRequest]
) -> StreamLoadResult:
    """Drive one level, the users cycling through ``requests``; blocks for
    ``warmup_s + duration_s`` and the drain. Raises ``ValueError`` if ``requests`` is empty."""
    if not requests:
        raise ValueError("requests must not be empty")
    messages = build_requests(config.host, config.port, config.path, [r.body for r in requests])
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(_run_level(config, requests, messages))
