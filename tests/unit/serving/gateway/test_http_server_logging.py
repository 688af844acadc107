"""The gateway's HTTP server leaves the process's logging as it found it.

In a Serve replica, Serve logs through a ``MemoryHandler`` that flushes to its log file. A
``logging.config.dictConfig`` (uvicorn's default ``log_config``) closes every handler of the
process: that buffer lost its target and kept every record from then on, and the gateway
replica grew with each request it logged (issue 12's 5-minute RSS run: 0.35 MiB/s)."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.handlers
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette

from serving.gateway.http_server import HttpServer


@pytest.fixture
def buffered() -> Iterator[tuple[logging.Logger, logging.handlers.MemoryHandler, io.StringIO]]:
    sink = io.StringIO()
    target = logging.StreamHandler(sink)
    handler = logging.handlers.MemoryHandler(capacity=2, target=target)
    logger = logging.getLogger("test.serve_like")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, handler, sink
    finally:
        logger.removeHandler(handler)
        handler.close()
        target.close()


def test_starting_the_server_closes_no_handler_and_a_log_buffer_still_flushes(
    buffered: tuple[logging.Logger, logging.handlers.MemoryHandler, io.StringIO],
) -> None:
    logger, handler, sink = buffered

    async def serve_once() -> None:
        server = HttpServer(Starlette(), host="127.0.0.1", port=0)
        await server.start()
        await server.stop()

    asyncio.run(serve_once())
    for n in range(10):
        logger.info("request %d", n)
    assert handler.target is not None
    assert len(handler.buffer) < handler.capacity  # flushed as it filled, not kept
    assert sink.getvalue().splitlines()[:2] == ["request 0", "request 1"]
