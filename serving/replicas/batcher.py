"""Dynamic batching for a replica's model: batch planning, adaptive waiting, expiry.

Inputs queue in arrival order, one request (a ``part`` of a call) per entry; one engine
thread runs batches of up to ``max_batch_size`` inputs. While the engine runs, newcomers
queue, so under load every batch starts full without waiting. An idle engine runs a lone
request at once unless the arrival rate says more inputs will come within ``max_wait_ms``
(then it waits, at most that long, for a fuller batch).

Before each engine run the batcher drops what nobody waits for: a request whose caller went
away (its future cancelled: the gateway gave up, a hedge lost) or whose deadline passed (its
future gets ``Expired``). Under overload the engine then works only for clients still waiting.

    batcher = Batcher(run, BatchPolicy(max_batch_size=32, max_wait_s=0.005),
                      admission=Admission("minilm", limit=1024))
    rows = await batcher.submit(["a", "b"], deadline_s=time.time() + 5)   # run's rows for them
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from serving.messages import Rows, concat_rows
from serving.replicas.admission import Admission, RateMeter

T = TypeVar("T")
R = TypeVar("R", bound=Rows)


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    max_batch_size: int
    """Most inputs in one engine run."""
    max_wait_s: float
    """Longest a free engine holds a partial batch back, waiting for more inputs."""


class Expired(Exception):
    """The request's deadline passed before the engine ran it: nothing was computed."""


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


def engine_thread() -> ThreadPoolExecutor:
    """The single thread every call into an engine runs on."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-engine")


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    inputs: Collection[T]
    future: asyncio.Future[R]
    enqueued_s: float
    deadline_s: float


class Batcher(Generic[T, R]):
    """Queues requests, runs their inputs through ``run_batch`` in batches on one engine
    thread. ``run_batch(inputs) -> rows`` returns one row per input (``Rows``).
    ``on_batch(size, seconds)`` hears of every engine run, ``on_expired(inputs)`` of every
    request dropped for its deadline (for metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], R],
        policy: BatchPolicy,
        *,
        admission: Admission,
        on_batch: Callable[[int, float], None] | None = None,
        on_expired: Callable[[int], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._policy = policy
        self._admission = admission
        self._on_batch = on_batch
        self._on_expired = on_expired
        self._queue: deque[_Pending[T, R]] = deque()
        self._queued_inputs = 0
        self._wakeup = asyncio.Event()
        self._arrivals = RateMeter()
        # One engine thread. Pass the one the engine was loaded on: torch ops split between two
        # threads cost a 2-thread CPU engine ~10 ms per small batch here (12 -> 22 ms, MiniLM).
        self._executor = executor or engine_thread()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def queued_inputs(self) -> int:
        """Inputs waiting for the engine (not the batch it runs now)."""
        return self._queued_inputs

    @property
    def admitted_inputs(self) -> int:
        """Inputs admitted and not yet answered: queued plus the batch running now."""
        return self._admission.admitted

    def check(self) -> None:
        """Raise if the batching loop has died: nothing queued would ever run."""
        task = self._loop_task
        if task is not None and task.done():
            cause = None if task.cancelled() else task.exception()
            raise RuntimeError(f"the batching loop stopped: {cause!r}")

    async def submit(self, inputs: Collection[T], deadline_s: float = math.inf) -> R:
        """The rows of one request; ``Overloaded`` when admission is full, ``Expired`` when
        its deadline passes before the engine runs it."""
        (future,) = self.submit_parts([(inputs, deadline_s)])
        return await future

    def submit_parts(self, parts: Sequence[tuple[Collection[T], float]]) -> list[asyncio.Future[R]]:
        """Queue several requests (``(inputs, deadline_s)`` each) admitted as one: all or
        none (``Overloaded``). A future per request, in order."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None:
            self._loop_task = loop.create_task(self._loop())
        total = sum(len(inputs) for inputs, _ in parts)
        self._admission.admit(total)
        now = time.monotonic()
        futures: list[asyncio.Future[R]] = []
        for inputs, deadline_s in parts:
            future: asyncio.Future[R] = loop.create_future()
            self._queue.append(_Pending(inputs, future, now, deadline_s))
            futures.append(future)
        self._queued_inputs += total
        self._arrivals.add(total)
        self._wakeup.set()
        return futures

    def _drop_gone(self) -> None:
        """Take out of the queue what nobody waits for: a caller gone (future cancelled) or a
        deadline passed (the future hears ``Expired``)."""
        if not any(p.future.done() or p.deadline_s != math.inf for p in self._queue):
            return
        now_s = time.time()
        kept: deque[_Pending[T, R]] = deque()
        for p in self._queue:
            gone = p.future.done()
            expired = not gone and p.deadline_s <= now_s
            if not (gone or expired):
                kept.append(p)
                continue
            self._queued_inputs -= len(p.inputs)
            self._admission.release(len(p.inputs))
            if expired:
                p.future.set_exception(Expired())
                if self._on_expired is not None:
                    self._on_expired(len(p.inputs))
        self._queue = kept

    async def _loop(self) -> None:
        idle_since = 0.0
        while True:
            self._drop_gone()
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
            self._queued_inputs -= sum(len(p.inputs) for p in batch)
            await self._run(batch)
            idle_since = time.monotonic()

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        inputs: list[T] = [x for p in batch for x in p.inputs]
        loop = asyncio.get_running_loop()
        try:
            chunks: list[R] = []
            for start in range(0, len(inputs), self._policy.max_batch_size):
                chunk = inputs[start : start + self._policy.max_batch_size]
                started = time.perf_counter()
                chunks.append(await loop.run_in_executor(self._executor, self._run_batch, chunk))
                if self._on_batch is not None:
                    self._on_batch(len(chunk), time.perf_counter() - started)
            rows = concat_rows(chunks)
        except Exception as exc:  # the engine failed: every caller in the batch hears why
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._admission.release(len(inputs))
        offset = 0
        for p in batch:
            n = len(p.inputs)
            if not p.future.done():  # a caller that gave up (cancelled) is skipped
                p.future.set_result(rows if len(batch) == 1 else rows.slice(offset, offset + n))
            offset += n

    def stop(self) -> None:
        """Stop the batching loop, leaving the engine thread to its owner (a thread shared by
        several batchers, one per model of a pool, outlives each of them)."""
        if self._loop_task is not None:
            self._loop_task.cancel()

    def close(self) -> None:
        self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
