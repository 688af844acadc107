"""The gateway's HTTP server against slow and greedy clients, over real sockets on 127.0.0.1:
the real server class (``HttpServer``) serving the real gateway app, its one model answered
in-process (no Ray). A half-sent header, a body trickled a byte at a time, an idle connection
and oversized headers are cut, each with its answer in the protocol's shape; while slow
clients are held, others are served; past the connection cap a new client is refused at once.

No test waits on a clock of its own: each waits for what the server answers (the cut is the
server's timer, configured short where the test wants the cut and far beyond the test where
it wants the slow clients held)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import uvloop
from inprocess import InProcessHandle, gateway_over
from prometheus_client import REGISTRY

from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.http_server import HttpLimits, HttpServer
from serving.gateway.routes.jobs import JobsSettings, build_jobs_service
from serving.messages import EmbedReply, InferCall, InferReply
from training.api import JobsService
from training.spec import ClusterCapacity

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Each scenario on both event loops: asyncio's, and uvloop's, which the gateway replica
    runs under Ray (its transports are not ``asyncio.Transport`` subclasses)."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


MODEL = "enc-slow"
EMBED = orjson.dumps({"model": MODEL, "input": ["hello"]})
HOLD_S = 600.0
"""A timeout far beyond any test: the slow clients stay held until the test lets them go."""
GUARD_S = 60.0
"""How long a test waits for an answer it expects before it calls the server hung."""


async def embed(call: InferCall) -> InferReply[EmbedReply]:
    n = len(call)
    return InferReply(EmbedReply(np.ones((n, 4), np.float32), (1,) * n, "1"))


def jobs_service(home: Path) -> JobsService:
    """A job store with no scheduler: what the jobs routes need, no Ray."""
    settings = JobsSettings(db_url=f"sqlite:///{home / 'loom.db'}")
    built = build_jobs_service(settings, max_body_bytes=1 << 20)
    return JobsService(
        store=built.store,
        capacity=lambda: ClusterCapacity(total_cpus=2, total_gpus=0),
        dataset_roots=built.dataset_roots,
    )


@asynccontextmanager
async def serving(
    limits: HttpLimits, *, jobs: JobsService | None = None, **server: Any
) -> AsyncIterator[HttpServer]:
    model = {"name": MODEL, "source": MODEL, "task": "embed"}
    config = parse_config({"server": server, "models": [model]})
    core = gateway_over(config, MODEL, InProcessHandle(embed))
    core.jobs = jobs
    app = build_http_app(core)
    http = HttpServer(app, host="127.0.0.1", port=0, limits=limits)
    await http.start()
    try:
        yield http
    finally:
        await http.stop()


class RawClient:
    """One connection that sends exactly the bytes it is told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """What the server answers before it closes the connection: (status, headers, body);
        (0, {}, b"") when it closed with no answer."""
        raw = await asyncio.wait_for(self.reader.read(), GUARD_S)
        if not raw:
            return 0, {}, b""
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return int(status_line.split()[1]), headers, body

    def nothing_received(self) -> bool:
        """True while the server has neither answered nor closed this connection."""
        return not self.reader.at_eof() and not len(self.reader._buffer)  # noqa: SLF001

    def close(self) -> None:
        self.writer.close()


def post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def trickle_until_cut(
    client: RawClient, data: bytes, chunk_bytes: int = 1
) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` ``chunk_bytes`` at a time (a pause between chunks), never its last
    byte, until the server answers."""
    answer = asyncio.ensure_future(client.answer())
    for start in range(0, len(data) - 1, chunk_bytes):
        if answer.done():
            break
        try:
            await client.send(data[start : min(start + chunk_bytes, len(data) - 1)])
        except ConnectionError:
            break
        await asyncio.wait([answer], timeout=0.05)
    return await answer


def counted(route: str, status: str) -> float:
    labels = {"model": "", "route": route, "status": status}
    return REGISTRY.get_sample_value("loom_requests_total", labels) or 0.0


def openai_error(body: bytes) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def test_a_half_sent_header_is_cut_with_408_in_each_protocols_shape(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(HttpLimits(header_read_timeout_s=0.2)) as http:
            v1 = await RawClient.connect(http.port)
            await v1.send(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Le")
            v2 = await RawClient.connect(http.port)
            await v2.send(b"POST /v2/models/enc-slow/infer HTTP/1.1\r\nHost: lo")
            status, headers, body = await v1.answer()
            assert status == 408
            assert headers["connection"] == "close"
            assert openai_error(body)["code"] == "header_timeout"
            status, _, body = await v2.answer()
            assert status == 408
            assert "headers did not arrive" in orjson.loads(body)["error"]

    run(scenario())


def test_a_body_trickled_a_byte_at_a_time_is_cut_with_408(run: Runner, tmp_path: Path) -> None:
    """Every body reader is cut: the routes' own (``body.read_body``) and the jobs router's."""

    async def scenario() -> None:
        before, before_500 = counted("embeddings", "408"), counted("embeddings", "500")
        limits = HttpLimits(body_read_timeout_s=0.5)
        async with serving(limits, jobs=jobs_service(tmp_path)) as http:
            for path in ("/v1/embeddings", f"/v2/models/{MODEL}/infer", "/v1/jobs"):
                client = await RawClient.connect(http.port)
                await client.send(post_head(path, len(EMBED)))
                status, headers, body = await trickle_until_cut(client, EMBED)
                assert status == 408, path
                assert headers["connection"] == "close"
                error = orjson.loads(body)["error"]
                message = error if path.startswith("/v2") else error["message"]
                assert "body did not arrive" in message
            # the connection count came back down: nothing of theirs is held
            assert await eventually(lambda: http.connections == 0)
            # the route counted its cut request as the 408 the client got, not a bug's 500
            assert await eventually(lambda: counted("embeddings", "408") == before + 1)
            assert counted("embeddings", "500") == before_500

    run(scenario())


async def eventually(condition: Any) -> bool:
    """Wait (up to GUARD_S) until ``condition()`` holds, as the server reports it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD_S
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_an_idle_connection_is_closed_and_a_kept_alive_one_too(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(HttpLimits(idle_timeout_s=1)) as http:
            silent = await RawClient.connect(http.port)
            assert await silent.answer() == (0, {}, b"")  # closed with no answer

            kept = await RawClient.connect(http.port)
            await kept.send(post_head("/v1/embeddings", len(EMBED)) + EMBED)
            raw = await asyncio.wait_for(kept.reader.readuntil(b"\r\n\r\n"), GUARD_S)
            assert raw.startswith(b"HTTP/1.1 200")
            length = int(raw.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(kept.reader.readexactly(length), GUARD_S)
            assert await kept.answer() == (0, {}, b"")  # then idle: closed

    run(scenario())


def test_headers_over_the_limit_are_refused_with_431_complete_or_still_coming(run: Runner) -> None:
    async def scenario() -> None:
        limits = HttpLimits(header_read_timeout_s=HOLD_S, max_header_bytes=4096)
        async with serving(limits) as http:
            whole = await RawClient.connect(http.port)
            await whole.send(b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
            status, _, body = await whole.answer()
            assert status == 431
            assert openai_error(body)["code"] == "headers_too_large"

            endless = await RawClient.connect(http.port)
            await endless.send(b"GET /v2 HTTP/1.1\r\nX-Big: ")
            status, _, body = await trickle_until_cut(endless, b"a" * 1_000_000, chunk_bytes=1024)
            assert status == 431
            assert isinstance(orjson.loads(body)["error"], str)

    run(scenario())


def test_slow_clients_are_held_while_others_are_served(run: Runner) -> None:
    """Header and body deadlines far beyond the test: the slow clients are held the whole
    time, and every other client is answered meanwhile."""

    async def scenario() -> None:
        limits = HttpLimits(header_read_timeout_s=HOLD_S, body_read_timeout_s=HOLD_S)
        async with serving(limits) as http:
            half_header = await RawClient.connect(http.port)
            await half_header.send(b"POST /v1/embeddings HTTP/1.1\r\nHost: lo")
            trickle = await RawClient.connect(http.port)
            await trickle.send(post_head("/v1/embeddings", len(EMBED)) + EMBED[:1])
            idle = await RawClient.connect(http.port)
            url = f"http://127.0.0.1:{http.port}"
            async with httpx.AsyncClient(base_url=url, timeout=GUARD_S) as client:
                for i in range(20):
                    await trickle.send(EMBED[1 + i : 2 + i])  # one more byte each time
                    answer = await client.post(
                        "/v1/embeddings",
                        content=EMBED,
                        headers={"Content-Type": "application/json"},
                    )
                    assert answer.status_code == 200
                    assert answer.json()["data"][0]["embedding"] == [1.0] * 4
            assert half_header.nothing_received()
            assert trickle.nothing_received()
            assert idle.nothing_received()
            for slow in (half_header, trickle, idle):
                slow.close()

    run(scenario())


def test_past_the_connection_cap_a_new_client_is_refused_503_and_served_once_one_leaves(
    run: Runner,
) -> None:
    async def scenario() -> None:
        async with serving(HttpLimits(max_connections=3)) as http:
            held = [await RawClient.connect(http.port) for _ in range(3)]
            assert await eventually(lambda: http.connections == 3)

            refused = await RawClient.connect(http.port)
            await refused.send(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, body = await refused.answer()
            assert status == 503
            assert headers["retry-after"] == "1"
            assert "limit of 3 connections" in orjson.loads(body)["error"]
            v1 = await RawClient.connect(http.port)
            await v1.send(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, _, body = await v1.answer()
            assert status == 503
            assert openai_error(body)["code"] == "too_many_connections"

            held.pop().close()
            assert await eventually(lambda: http.connections == 2)
            url = f"http://127.0.0.1:{http.port}"
            async with httpx.AsyncClient(base_url=url, timeout=GUARD_S) as client:
                assert (await client.get("/v2/health/live")).status_code == 200
            for client_ in held:
                client_.close()

    run(scenario())


def test_a_request_the_parser_cannot_read_is_400_in_shape(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(HttpLimits()) as http:
            client = await RawClient.connect(http.port)
            await client.send(b"GET /v1/models HTTP/1.1\r\nBad Header\x01: x\r\n\r\n")
            status, _, body = await client.answer()
            assert status == 400
            assert openai_error(body)["code"] == "bad_http"

    run(scenario())
