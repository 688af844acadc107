"""The faults benchmark's load and figures: every arrival of the open loop is accounted for
(answered, refused or backlogged), and the windows and ratios are cut from what was kept."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from benchmarks.faults import NS_PER_S, Outcome, between, closed_loop, open_loop, summarise
from benchmarks.loadgen import build_requests


async def serve(answers: list[int]) -> tuple[asyncio.Server, int]:
    """A keep-alive HTTP/1.1 server answering 200 and 503 in turn, counting requests."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                status = 503 if len(answers) % 2 else 200
                answers.append(status)
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def arrivals(rate_per_s: float, duration_s: float, seed: int) -> int:
    """How many arrivals the open loop schedules: its own draw, replayed."""
    rng = random.Random(seed)
    due, end, count = 0, int(duration_s * NS_PER_S), 0
    while due < end:
        count += 1
        due += int(rng.expovariate(rate_per_s) * NS_PER_S)
    return count


def test_every_open_loop_arrival_is_sent_and_its_answer_kept() -> None:
    answers: list[int] = []

    async def scenario() -> list[Outcome]:
        server, port = await serve(answers)
        requests = build_requests("127.0.0.1", port, "/x", [b"{}"])
        async with server:
            return await open_loop(port, requests, 400.0, 0.25, max_connections=64, seed=3)

    outcomes = asyncio.run(scenario())
    assert len(outcomes) == arrivals(400.0, 0.25, seed=3)
    assert sorted(o.result for o in outcomes) == sorted(answers)  # nothing lost or invented
    figures = summarise(outcomes)
    assert figures["ok"] + figures["not_ok"].get("503", 0) == len(outcomes)


def test_past_the_connection_cap_an_arrival_is_counted_as_backlog() -> None:
    """A server that accepts and never answers: two arrivals hold the two connections, the
    rest find none free, and the two are given up as unanswered once the arrivals end."""

    async def scenario() -> list[Outcome]:
        never = asyncio.Event()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await never.wait()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        requests = build_requests("127.0.0.1", port, "/x", [b"{}"])
        async with server:
            return await open_loop(
                port, requests, 200.0, 0.2, max_connections=2, seed=1, drain_timeout_s=0
            )

    outcomes = asyncio.run(scenario())
    kinds = Counter(o.result for o in outcomes)
    assert len(outcomes) == arrivals(200.0, 0.2, seed=1)
    assert kinds == {"client_backlog": len(outcomes) - 2, "unanswered": 2}


def test_a_closed_loop_keeps_every_request_and_windows_cut_by_start() -> None:
    answers: list[int] = []

    async def scenario() -> list[Outcome]:
        server, port = await serve(answers)
        requests = build_requests("127.0.0.1", port, "/x", [b"{}"])
        async with server:
            return await closed_loop(port, requests, 2, 0.1)

    outcomes = asyncio.run(scenario())
    assert len(outcomes) == len(answers)
    middle = sorted(o.start_ns for o in outcomes)[len(outcomes) // 2]
    first, last = outcomes[0].start_ns, max(o.start_ns for o in outcomes) + 1
    assert len(between(outcomes, first, middle)) + len(between(outcomes, middle, last)) == len(
        outcomes
    )
