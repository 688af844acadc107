"""The open-loop load generator (``benchmarks.openloop``): a seeded Poisson schedule, and a
latency measured from each request's scheduled arrival, so time spent waiting for a
connection counts. Against a small keep-alive HTTP server on 127.0.0.1 in a thread that
answers each request after a fixed service time (the assertions are lower bounds that a
slower machine only makes truer)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from benchmarks.loadgen import NS_PER_S
from benchmarks.openloop import OpenLoadConfig, poisson_arrivals, run_open_load


@dataclass
class SlowServer:
    port: int
    service_s: float


@pytest.fixture
def slow_server(request: pytest.FixtureRequest) -> Iterator[SlowServer]:
    """Serves one request at a time (a lock), each after ``service_s`` (parametrized)."""
    service_s: float = getattr(request, "param", 0.0)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                async with lock:  # one at a time: a server with one worker
                    await asyncio.sleep(service_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed its connection
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box["port"] = server.sockets[0].getsockname()[1]
        started.set()
        async with server:
            await stop.wait()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:  # connections the client left open
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    lock, stop = asyncio.Lock(), asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    started.wait(10)
    yield SlowServer(int(box["port"]), service_s)  # type: ignore[call-overload]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def test_arrivals_are_a_seeded_poisson_schedule_at_the_rate_asked() -> None:
    arrivals = poisson_arrivals(200, 100, seed=7)

    assert arrivals == poisson_arrivals(200, 100, seed=7)  # same seed, same schedule
    assert arrivals != poisson_arrivals(200, 100, seed=8)
    assert arrivals == sorted(arrivals)
    assert arrivals[0] > 0
    assert arrivals[-1] < 100
    # 200/s x 100 s = 20,000 expected; a Poisson count's sd is sqrt(20,000) ~ 141
    assert abs(len(arrivals) - 20_000) < 5 * 141


def test_a_bad_rate_or_target_is_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        poisson_arrivals(0, 1)
    with pytest.raises(ValueError, match="127.0.0.1"):
        OpenLoadConfig(port=1, path="/", rate_per_s=1, warmup_s=0, duration_s=1, host="::1")


@pytest.mark.parametrize("slow_server", [0.02], indirect=True)
def test_latency_counts_the_wait_for_a_connection_from_the_scheduled_arrival(
    slow_server: SlowServer,
) -> None:
    """10,000/s offered to one connection and a server of 20 ms per request: the k-th answer
    cannot end before k x 20 ms, and it was scheduled almost at once, so its latency is
    about k x 20 ms, not the 20 ms a closed loop would report."""
    config = OpenLoadConfig(
        port=slow_server.port, path="/", rate_per_s=10_000, warmup_s=0, duration_s=0.3,
        max_connections=1, drain_timeout_s=0.5, seed=1,
    )  # fmt: skip
    arrivals_s = poisson_arrivals(10_000, 0.3, seed=1)

    result = run_open_load(config, [b"{}"])

    assert result.errors == 0
    assert result.requests >= 2  # queueing shows from the second answer on
    service_ns = int(slow_server.service_s * NS_PER_S)
    for k, latency_ns in enumerate(result.latencies_ns, 1):  # answers end in order
        assert latency_ns >= k * service_ns - int(arrivals_s[k - 1] * NS_PER_S), k
    # offered: every arrival of the window; achieved: what was answered in it (<= 0.3 / 0.02)
    assert result.scheduled == len(arrivals_s)
    assert result.offered_rate_per_s == pytest.approx(len(arrivals_s) / 0.3)
    assert result.achieved_rate_per_s <= 0.3 / 0.02 / 0.3


@pytest.mark.parametrize("slow_server", [0.0], indirect=True)
def test_under_capacity_every_answer_is_counted_without_errors(slow_server: SlowServer) -> None:
    config = OpenLoadConfig(
        port=slow_server.port, path="/", rate_per_s=100, warmup_s=0.2, duration_s=0.5,
        max_connections=4, seed=3,
    )  # fmt: skip

    result = run_open_load(config, [b'{"input": "a"}', b'{"input": "b"}'])

    in_window = [t for t in poisson_arrivals(100, 0.7, seed=3) if t >= 0.2]
    assert result.scheduled == len(in_window)
    assert result.errors == 0
    assert 0 < result.requests <= result.scheduled + 4  # + what warm-up left in flight
