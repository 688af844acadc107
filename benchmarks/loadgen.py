"""A closed-loop HTTP load generator light enough to share two cores with the server it drives.

C virtual users each hold one keep-alive HTTP/1.1 connection and send the next request as
soon as the previous one answers. Requests are pre-encoded bytes; each answer's latency goes
into a preallocated list with ``time.perf_counter_ns``. An answer counts if it arrives inside
the measured window. Only 127.0.0.1 is a valid target.

The client is a minimal HTTP/1.1 client over asyncio streams (on uvloop when installed): it
writes prebuilt request bytes and reads status line, headers and a Content-Length or chunked
body. Against the no-op server at c=64 on the 2-core dev box (server and client sharing it)
it drove 10,500-15,400 req/s using about half a core; aiohttp (one TCPConnector, limit=64,
pre-encoded bodies, same event loop) drove 3,900-4,000 req/s using a whole core. So this one.

    config = LoadConfig(port=8000, path="/v1/embeddings", concurrency=64,
                        warmup_s=3.0, duration_s=15.0)
    result = run_load(config, bodies)          # blocks for warmup_s + duration_s
    print(result.requests / result.duration_s, "req/s")
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

LOCALHOST = "127.0.0.1"
NS_PER_S = 1_000_000_000


def check_target(host: str, path: str) -> None:
    """``ValueError`` unless the target is 127.0.0.1 and ``path`` absolute (both generators)."""
    if host != LOCALHOST:
        raise ValueError(f"load generator targets {LOCALHOST} only, got {host!r}")
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """One closed-loop load level against ``http://127.0.0.1:{port}{path}``."""

    port: int
    path: str
    concurrency: int
    """Virtual users; each has one connection and at most one request in flight."""
    warmup_s: float
    """Load runs this long before the measured window opens; answers in it are not recorded."""
    duration_s: float
    """Length of the measured window."""
    host: str = LOCALHOST
    max_requests: int = 2_000_000
    """Capacity of the preallocated latency list; users stop when it is full."""
    drain_timeout_s: float = 30.0
    """After the window closes, in-flight requests get this long before they are cancelled."""
    reconnect_backoff_s: float = 0.05
    """Pause before a user reconnects after a failed connection (no hot loop on refusal)."""
    max_reconnects_per_user: int = 1_000

    def __post_init__(self) -> None:
        check_target(self.host, self.path)
        if self.concurrency < 1 or self.max_requests < 1:
            raise ValueError("concurrency and max_requests must be >= 1")
        if self.warmup_s < 0 or self.duration_s <= 0:
            raise ValueError("warmup_s must be >= 0 and duration_s > 0")


@dataclass(kw_only=True)
class LoadResult:
    """What one level measured: the requests that completed inside the window.

    ``latencies_ns`` holds one entry per successful request (``len == requests``).
    """

    concurrency: int
    duration_s: float
    requests: int
    errors: int
    latencies_ns: list[int]
    error_kinds: dict[str, int] = field(default_factory=dict)
    loadgen_cpu_s: float = 0.0
    """CPU time this process used during the measured window."""


class Recorder:
    """Shared by the users of one level; one event loop thread, so no locks."""

    def __init__(self, *, capacity: int, window_start_ns: int, window_end_ns: int) -> None:
        self.latencies_ns = [0] * capacity
        self.count = 0
        self.errors = 0
        self.error_kinds: Counter[str] = Counter()
        self.window_start_ns = window_start_ns
        self.window_end_ns = window_end_ns

    @property
    def full(self) -> bool:
        return self.count >= len(self.latencies_ns)

    def in_window(self, end_ns: int) -> bool:
        # a request counts where it completes: in steady state the ones sent during warm-up
        # that finish in the window stand in for those still in flight when it closes
        # (at c=64 and 0.5 s per answer, requiring both ends inside would drop ~64)
        return self.window_start_ns <= end_ns <= self.window_end_ns

    def success(self, start_ns: int, end_ns: int) -> None:
        if self.in_window(end_ns) and not self.full:
            self.latencies_ns[self.count] = end_ns - start_ns
            self.count += 1

    def failure(self, end_ns: int, kind: str) -> None:
        if self.in_window(end_ns):
            self.errors += 1
            self.error_kinds[kind] += 1

    def results(self) -> dict[str, Any]:
        """What the window recorded, as ``LoadResult``'s fields."""
        return {
            "requests": self.count,
            "errors": self.errors,
            "latencies_ns": self.latencies_ns[: self.count],
            "error_kinds": dict(self.error_kinds),
        }


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client can frame."""


class RawHttpConnection:
    """One keep-alive HTTP/1.1 connection that sends prebuilt requests and frames answers."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)

    @property
    def is_open(self) -> bool:
        """Open, and not closed by the server while idle: a server's FIN already seen makes
        the connection unusable, and a pooling client (httpcore, urllib3) checks for it
        before reuse rather than send a request into it."""
        if self._writer is None:
            return False
        return self._reader is None or not self._reader.at_eof()

    async def reopen_if_closed(self) -> None:
        """A fresh connection when this one is not open (never opened, or closed by either
        side)."""
        if not self.is_open:
            await self.close()
            await self.open()

    async def send(self, request: bytes) -> int:
        """Send ``request`` (a complete HTTP/1.1 message); returns the answer's status code."""
        if self._reader is None or self._writer is None:
            raise ConnectionError("connection is not open")
        # no drain(): one small request per round trip, so the write buffer never builds up
        self._writer.write(request)
        status, server_closes = await read_response(self._reader)
        if server_closes:
            await self.close()
        return status

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader, max_chunks: int = 10_000) -> tuple[int, bool]:
    """Read one HTTP/1.x answer to its end; returns (status, whether the server will close).

    The body is framed by Content-Length or chunked transfer encoding and discarded. Raises
    ``ProtocolError`` for anything else (a body delimited only by closing the connection).
    """
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x status line: {head[:40]!r}")
    status = int(head[9:12])  # b"HTTP/1.1 200 OK": the code is bytes 9..11
    lowered = head.lower()
    marker = lowered.find(b"\r\ncontent-length:")
    if marker >= 0:
        end = lowered.index(b"\r\n", marker + 2)
        length = int(lowered[marker + len(b"\r\ncontent-length:") : end])
        if length:
            await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lowered:
        for _ in range(max_chunks):
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await _skip_trailer(reader)
                break
            await reader.readexactly(size + 2)  # the chunk and its CRLF
        else:
            raise ProtocolError(f"more than {max_chunks} chunks")
    elif status not in (204, 304) and not 100 <= status < 200:
        raise ProtocolError("answer has neither Content-Length nor a chunked body")
    return status, b"\r\nconnection: close" in lowered


async def _skip_trailer(reader: asyncio.StreamReader, max_lines: int = 100) -> None:
    """Read trailer lines after the last chunk up to the empty line that ends the message."""
    for _ in range(max_lines):
        if await reader.readuntil(b"\r\n") == b"\r\n":
            return
    raise ProtocolError(f"more than {max_lines} trailer lines")


def build_requests(host: str, port: int, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    """Complete HTTP/1.1 POST messages, one per JSON body, built once before the run."""
    requests = []
    for body in bodies:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode("ascii") + body)
    return requests


async def _user(
    config: LoadConfig, requests: Sequence[bytes], offset: int, recorder: Recorder
) -> None:
    """One virtual user: send, wait for the answer, send the next, until the window closes."""
    connection = RawHttpConnection(config.host, config.port)
    reconnects = 0
    index = offset
    try:
        for _ in range(config.max_requests):
            start_ns = time.perf_counter_ns()
            if start_ns >= recorder.window_end_ns or recorder.full:
                return
            try:
                await connection.reopen_if_closed()
                status = await connection.send(requests[index % len(requests)])
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ProtocolError,
                ValueError,
            ) as exc:
                recorder.failure(time.perf_counter_ns(), type(exc).__name__)
                await connection.close()
                reconnects += 1
                if reconnects > config.max_reconnects_per_user:
                    return
                await asyncio.sleep(config.reconnect_backoff_s)
                continue
            end_ns = time.perf_counter_ns()
            if status == 200:
                recorder.success(start_ns, end_ns)
            else:
                recorder.failure(end_ns, f"http_{status}")
            index += 1
    finally:
        await connection.close()


async def _run_level(config: LoadConfig, requests: Sequence[bytes]) -> LoadResult:
    now_ns = time.perf_counter_ns()
    window_start_ns = now_ns + int(config.warmup_s * NS_PER_S)
    window_end_ns = window_start_ns + int(config.duration_s * NS_PER_S)
    recorder = Recorder(
        capacity=config.max_requests,
        window_start_ns=window_start_ns,
        window_end_ns=window_end_ns,
    )
    # users start at different bodies so concurrent requests carry different sentences
    stride = max(1, len(requests) // config.concurrency)
    users = [
        asyncio.create_task(_user(config, requests, i * stride, recorder))
        for i in range(config.concurrency)
    ]
    cpu_s = await drive_window(
        users,
        window_start_ns=window_start_ns,
        window_end_ns=window_end_ns,
        drain_timeout_s=config.drain_timeout_s,
    )
    return LoadResult(
        concurrency=config.concurrency,
        duration_s=config.duration_s,
        loadgen_cpu_s=cpu_s,
        **recorder.results(),
    )


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_on_own_loop(coro: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    """Run one level's coroutine on a fresh event loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coro)


def run_load(config: LoadConfig, bodies: Sequence[bytes]) -> LoadResult:
    """Drive one level for ``warmup_s + duration_s`` and return what the window measured.

    Blocks; runs its own event loop. Raises ``ValueError`` if ``bodies`` is empty.
    """
    if not bodies:
        raise ValueError("bodies must not be empty")
    requests = build_requests(config.host, config.port, config.path, bodies)
    return run_on_own_loop(_run_level(config, requests))


def run_requests(config: LoadConfig, requests: Sequence[bytes]) -> LoadResult:
    """``run_load`` over complete HTTP messages built by the caller (``build_requests``), so
    one level can mix paths (many models); ``config.path`` is then only a label."""
    if not requests:
        raise ValueError("requests must not be empty")
    return run_on_own_loop(_run_level(config, requests))


async def drive_window(
    users: list[asyncio.Task],
    *,
    window_start_ns: int,
    window_end_ns: int,
    drain_timeout_s: float,
) -> float:
    """Let ``users`` run through the measured window, then drain them (cancelling stragglers
    after ``drain_timeout_s``); returns this process's CPU seconds inside the window. Raises
    if a user failed."""
    await asyncio.sleep(max(0.0, (window_start_ns - time.perf_counter_ns()) / NS_PER_S))
    cpu_start_s = time.process_time()
    await asyncio.sleep(max(0.0, (window_end_ns - time.perf_counter_ns()) / NS_PER_S))
    cpu_s = time.process_time() - cpu_start_s
    _, pending = await asyncio.wait(users, timeout=drain_timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in users:
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError("a virtual user failed") from task.exception()
    return cpu_s
