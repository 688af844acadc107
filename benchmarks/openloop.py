"""The open-loop load generator: requests arrive on a Poisson schedule at a target rate,
whether or not earlier ones have been answered (issue 16, point 2).

A closed loop (``benchmarks.loadgen``) slows down with the server it measures, so it never
sees a queue build: it is the right tool for "how fast at concurrency C". An open loop keeps
arriving at the offered rate, the way independent clients do, so a server past its capacity
shows it as latency that grows with the queue. Each latency is measured from the request's
*scheduled* arrival, not from when a connection was free to send it: the time it waited
here for one of the ``max_connections`` connections is queueing the client would have seen.

    config = OpenLoadConfig(port=8000, path="/v1/embeddings", rate_per_s=200,
                            warmup_s=3.0, duration_s=15.0)
    result = run_open_load(config, bodies)
    result.achieved_rate_per_s, result.offered_rate_per_s

Arrivals are drawn from a seeded generator (``poisson_arrivals``): two runs at the same rate
and seed offer the same schedule. Only 127.0.0.1 is a valid target, as for the closed loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.loadgen import (
    LOCALHOST,
    NS_PER_S,
    LoadResult,
    ProtocolError,
    RawHttpConnection,
    Recorder,
    build_requests,
    check_target,
    drive_window,
    run_on_own_loop,
)

SEND_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError)


def poisson_arrivals(rate_per_s: float, duration_s: float, *, seed: int = 0) -> list[float]:
    """Arrival times (seconds from 0, ascending, all < ``duration_s``) of a Poisson process
    at ``rate_per_s``: exponential gaps of mean 1 / rate. 200/s over 15 s -> about 3,000."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("rate_per_s and duration_s must be > 0")
    draw = random.Random(seed)
    arrivals, t = [], draw.expovariate(rate_per_s)
    while t < duration_s:
        arrivals.append(t)
        t += draw.expovariate(rate_per_s)
    return arrivals


@dataclass(frozen=True, kw_only=True)
class OpenLoadConfig:
    """One open-loop level against ``http://127.0.0.1:{port}{path}``."""

    port: int
    path: str
    rate_per_s: float
    """Offered arrivals per second (Poisson)."""
    warmup_s: float
    """Arrivals run this long before the measured window opens; not recorded."""
    duration_s: float
    """Length of the measured window."""
    max_connections: int = 256
    """Connections requests are sent on; an arrival finding all busy waits (queueing)."""
    seed: int = 0
    host: str = LOCALHOST
    drain_timeout_s: float = 30.0
    """After the window closes, what is queued or in flight gets this long."""

    def __post_init__(self) -> None:
        check_target(self.host, self.path)
        if self.rate_per_s <= 0 or self.max_connections < 1:
            raise ValueError("rate_per_s must be > 0 and max_connections >= 1")
        if self.warmup_s < 0 or self.duration_s <= 0:
            raise ValueError("warmup_s must be >= 0 and duration_s > 0")


@dataclass(kw_only=True)
class OpenLoadResult(LoadResult):
    """``LoadResult`` (``concurrency`` is ``max_connections``) plus what was offered: the
    arrivals scheduled inside the window and the rate they make."""

    offered_rate_per_s: float = 0.0
    scheduled: int = 0
    """Arrivals scheduled inside the measured window."""

    @property
    def achieved_rate_per_s(self) -> float:
        """Successful answers completed inside the window, per second."""
        return self.requests / self.duration_s


async def _sender(
    config: OpenLoadConfig,
    queue: asyncio.Queue[tuple[int, bytes] | None],
    recorder: Recorder,
) -> None:
    """One connection: send what arrives, in arrival order, until told to stop (None)."""
    connection = RawHttpConnection(config.host, config.port)
    try:
        while (item := await queue.get()) is not None:
            scheduled_ns, request = item
            try:
                await connection.reopen_if_closed()
                status = await connection.send(request)
            except SEND_ERRORS as exc:
                recorder.failure(time.perf_counter_ns(), type(exc).__name__)
                await connection.close()
                continue
            end_ns = time.perf_counter_ns()
            if status == 200:
                recorder.success(scheduled_ns, end_ns)  # from arrival: queueing included
            else:
                recorder.failure(end_ns, f"http_{status}")
    finally:
        await connection.close()


async def _arrive(
    config: OpenLoadConfig,
    requests: Sequence[bytes],
    arrivals: Sequence[float],
    queue: asyncio.Queue[tuple[int, bytes] | None],
    start_ns: int,
) -> None:
    """Put each request on the queue at its scheduled time (``arrivals``, seconds from
    ``start_ns``), then one stop per sender."""
    for index, offset_s in enumerate(arrivals):
        scheduled_ns = start_ns + int(offset_s * NS_PER_S)
        delay_s = (scheduled_ns - time.perf_counter_ns()) / NS_PER_S
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        queue.put_nowait((scheduled_ns, requests[index % len(requests)]))
    for _ in range(config.max_connections):
        queue.put_nowait(None)


async def _run_open_level(config: OpenLoadConfig, requests: Sequence[bytes]) -> OpenLoadResult:
    start_ns = time.perf_counter_ns()
    window_start_ns = start_ns + int(config.warmup_s * NS_PER_S)
    window_end_ns = window_start_ns + int(config.duration_s * NS_PER_S)
    arrivals = poisson_arrivals(
        config.rate_per_s, config.warmup_s + config.duration_s, seed=config.seed
    )
    recorder = Recorder(
        capacity=len(arrivals) + 1, window_start_ns=window_start_ns, window_end_ns=window_end_ns
    )
    queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
    tasks = [asyncio.create_task(_arrive(config, requests, arrivals, queue, start_ns))]
    tasks += [
        asyncio.create_task(_sender(config, queue, recorder)) for _ in range(config.max_connections)
    ]
    cpu_s = await drive_window(
        tasks,
        window_start_ns=window_start_ns,
        window_end_ns=window_end_ns,
        drain_timeout_s=config.drain_timeout_s,
    )
    scheduled = sum(1 for t in arrivals if config.warmup_s <= t)
    return OpenLoadResult(
        concurrency=config.max_connections,
        duration_s=config.duration_s,
        loadgen_cpu_s=cpu_s,
        **recorder.results(),
        offered_rate_per_s=scheduled / config.duration_s,
        scheduled=scheduled,
    )


def run_open_load(config: OpenLoadConfig, bodies: Sequence[bytes]) -> OpenLoadResult:
    """Offer ``config.rate_per_s`` for ``warmup_s + duration_s`` and return what the window
    measured. Blocks; runs its own event loop. ``ValueError`` if ``bodies`` is empty."""
    if not bodies:
        raise ValueError("bodies must not be empty")
    requests = build_requests(config.host, config.port, config.path, bodies)
    result = run_on_own_loop(_run_open_level(config, requests))
    assert isinstance(result, OpenLoadResult)
    return result
