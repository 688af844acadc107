"""Dynamic batching for a model server: admission, batch planning, adaptive waiting.

Inputs queue in arrival order; one engine thread runs batches of up to ``max_batch_size``
inputs. While the engine runs, newcomers queue, so under load every batch starts full without
waiting. An idle engine runs a lone request at once unless the arrival rate says more inputs
will come within ``max_wait_ms`` (then it waits, at most that long, for a fuller batch).

    batcher = Batcher(engine.run, BatchPolicy(max_batch_size=32, max_wait_s=0.005, max_queued=1024))
    rows = await batcher.submit(["a", "b"])   # the engine's result for these two inputs
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    max_batch_size: int
    """Most inputs in one engine run."""
    max_wait_s: float
    """Longest a free engine holds a partial batch back, waiting for more inputs."""
    max_queued: int
    """Inputs admitted (queued plus running) before submit refuses."""


class QueueFull(Exception):
    """Admission refused: the queue holds ``max_queued`` inputs already."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


def plan_batch(queued_sizes: Sequence[int], max_batch_size: int) -> int:
    """How many queued requests (front first) the next engine run takes.

    Always at least one (a request larger than a batch runs in chunks on its own); then as many
    as fit: sizes [10, 10, 20] with max 32 -> 2 (10 + 10 = 20; + 20 would be 40 > 32).
    """
    if not queued_sizes:
        return 0
    total, taken = queued_sizes[0], 1
    for size in queued_sizes[1:]:
        if total + size > max_batch_size:
            break
        total += size
        taken += 1
    return taken


def batch_wait_s(
    *, queued_inputs: int, max_batch_size: int, arrivals_per_s: float, max_wait_s: float
) -> float:
    """How long an idle engine should wait for more inputs before running what it has.

    Waits only when more inputs are expected within ``max_wait_s``: 200 inputs/s x 5 ms = 1
    expected -> wait for the rest of the batch, at most 5 ms; 50/s x 5 ms = 0.25 -> run now.
    """
    if queued_inputs >= max_batch_size or max_wait_s <= 0 or arrivals_per_s <= 0:
        return 0.0
    if arrivals_per_s * max_wait_s < 1.0:
        return 0.0
    time_to_fill_s = (max_batch_size - queued_inputs) / arrivals_per_s
    return min(max_wait_s, time_to_fill_s)


def retry_after_s(queued_inputs: int, inputs_per_s: float) -> int:
    """Seconds until the queue has likely drained: 600 queued at 300/s -> 2 s; at least 1."""
    if inputs_per_s <= 0:
        return 1
    return max(1, math.ceil(queued_inputs / inputs_per_s))


def engine_thread() -> ThreadPoolExecutor:
    """The single thread every call into an engine runs on."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-engine")


class RateMeter:
    """Exponentially weighted events-per-second, updated as events happen."""

    def __init__(self, half_life_s: float = 1.0) -> None:
        self._half_life_s = half_life_s
        self._rate = 0.0
        self._last = time.monotonic()

    def add(self, count: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        dt = max(now - self._last, 1e-6)
        decay = 0.5 ** (dt / self._half_life_s)
        # the events arrived over dt: blend their instantaneous rate in by the elapsed weight
        self._rate = self._rate * decay + (count / dt) * (1.0 - decay)
        self._last = now

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self._rate * 0.5 ** (max(now - self._last, 0.0) / self._half_life_s)


@dataclass(slots=True)
class _Pending(Generic[T]):
    inputs: Sequence[T]
    future: asyncio.Future
    enqueued_s: float


class Batcher(Generic[T]):
    """Queues inputs, runs them through ``run_batch`` in batches on one engine thread.

    ``run_batch(inputs) -> rows`` must return one row per input, indexable by slice.
    ``on_batch(size, seconds)`` is told of every engine run (for metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Any],
        policy: BatchPolicy,
        *,
        split_rows: Callable[[Any, int, int], Any] | None = None,
        concat_rows: Callable[[list[Any]], Any] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._policy = policy
        self._split_rows = split_rows or (lambda rows, start, stop: rows[start:stop])
        self._concat_rows = concat_rows or (lambda parts: [row for part in parts for row in part])
        self._on_batch = on_batch
        self._queue: deque[_Pending[T]] = deque()
        self._queued_inputs = 0
        self._wakeup = asyncio.Event()
        self._arrivals = RateMeter()
        self._throughput = RateMeter(half_life_s=5.0)
        # One engine thread. Pass the one the engine was loaded on: torch ops split between two
        # threads cost a 2-thread CPU engine ~10 ms per small batch here (12 -> 22 ms, MiniLM).
        self._executor = executor or engine_thread()
        self._loop_task: asyncio.Task | None = None

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    def check(self) -> None:
        """Raise if the batching loop has died: nothing queued would ever run."""
        task = self._loop_task
        if task is not None and task.done():
            cause = None if task.cancelled() else task.exception()
            raise RuntimeError(f"the batching loop stopped: {cause!r}")

    async def submit(self, inputs: Sequence[T]) -> Any:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        if self._queued_inputs + len(inputs) > self._policy.max_queued:
            raise QueueFull(retry_after_s(self._queued_inputs, self._throughput.rate()))
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, future, time.monotonic()))
        self._queued_inputs += len(inputs)
        self._arrivals.add(len(inputs))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        idle_since = 0.0
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # The wait clock starts when the engine is free and an input is there, as with
            # @serve.batch: under a closed loop of clients, requests answered together come
            # back together, and a short wait merges them with the queue into one fuller batch.
            forming_since = max(self._queue[0].enqueued_s, idle_since)
            wait_s = batch_wait_s(
                queued_inputs=self._queued_inputs,
                max_batch_size=self._policy.max_batch_size,
                arrivals_per_s=self._arrivals.rate(),
                max_wait_s=self._policy.max_wait_s - (time.monotonic() - forming_since),
            )
            if wait_s > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait_s)
                continue  # re-plan with what arrived; max_wait bounds the total
            taken = plan_batch([len(p.inputs) for p in self._queue], self._policy.max_batch_size)
            batch = [self._queue.popleft() for _ in range(taken)]
            await self._run(batch)
            idle_since = time.monotonic()

    async def _run(self, batch: list[_Pending[T]]) -> None:
        inputs: list[T] = [x for p in batch for x in p.inputs]
        loop = asyncio.get_running_loop()
        try:
            rows = []
            for start in range(0, len(inputs), self._policy.max_batch_size):
                chunk = inputs[start : start + self._policy.max_batch_size]
                started = time.perf_counter()
                rows.append(await loop.run_in_executor(self._executor, self._run_batch, chunk))
                if self._on_batch is not None:
                    self._on_batch(len(chunk), time.perf_counter() - started)
            result = rows[0] if len(rows) == 1 else self._concat_rows(rows)
        except Exception as exc:  # the engine failed: every caller in the batch hears why
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._queued_inputs -= len(inputs)
            self._throughput.add(len(inputs))
        offset = 0
        for p in batch:
            n = len(p.inputs)
            if not p.future.done():  # a caller that gave up (cancelled) is skipped
                p.future.set_result(self._split_rows(result, offset, offset + n))
            offset += n

    def stop(self) -> None:
        """Stop the batching loop, leaving the engine thread to its owner (a thread shared by
        several batchers, one per model of a pool, outlives each of them)."""
        if self._loop_task is not None:
            self._loop_task.cancel()

    def close(self) -> None:
        self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
