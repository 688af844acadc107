"""Batch before you hop: the gateway joins concurrent requests for one model into one call.

Every actor hop costs about a millisecond of CPU on each side on a small node, so the gateway
makes one call per batch rather than one per request. It never waits on a timer: a request
goes at once while fewer than ``max_in_flight`` calls are out; otherwise it queues and leaves
with the next call, together with everything that queued meanwhile. At concurrency 1 that is
one call per request with no added wait; at concurrency 64 it is a few calls of ~30 inputs.

A request whose caller stopped waiting (its wait cancelled: the gateway answered 504, the
client went away) or whose deadline passed while it queued here is left out of the next call:
no replica computes what nobody reads. Each request crosses the hop as its own part of the
call (``messages.InferCall``), with its envelope, so the replica can skip it too.

The queue is bounded twice, and both bounds shed with ``Overloaded`` (503, Retry-After):
past ``max_waiting_inputs`` queued a request is refused at once, since the replicas behind it
are already full; and with ``max_wait_s`` a request that has waited here that long is not
sent but shed, so no request the replicas compute spent more than ``max_wait_s`` in this
queue (the replica's admission bounds the wait in its own, ``replicas.admission``). Shedding
here costs no hop: under overload the replicas' CPU goes to requests that can still be
answered in time, not to refusing calls.

    coalescer = Coalescer(call=lambda call: handle.infer.remote(call), max_batch_inputs=32,
                          max_in_flight=2, max_waiting_inputs=64, max_wait_s=0.05,
                          model="minilm")
    rows = await coalescer.submit(envelope, ["hello"])
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from serving.messages import (
    DeadlineExceeded,
    Envelope,
    InferCall,
    InferReply,
    Overloaded,
    ReplicaUnavailable,
    Rows,
)
from serving.replicas.batcher import plan_batch

R = TypeVar("R", bound=Rows)


@dataclass(slots=True)
class _Waiting(Generic[R]):
    envelope: Envelope
    inputs: Sequence[Any]
    future: asyncio.Future[R]
    enqueued_s: float


class Coalescer(Generic[R]):
    """Joins concurrent submissions into calls of at most ``max_batch_inputs`` inputs.

    ``call(InferCall) -> InferReply`` makes the hop; each caller gets its own part's rows.
    """

    def __init__(
        self,
        *,
        call: Callable[[InferCall], Awaitable[InferReply[R]]],
        max_batch_inputs: int,
        max_in_flight: int,
        model: str,
        max_waiting_inputs: int | None = None,
        max_wait_s: float | None = None,
        on_shed: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_waiting_inputs``: the most inputs queued here (None: unbounded);
        ``max_wait_s``: the longest a request waits here before it is shed rather than sent
        (None: until its deadline), on ``clock``; ``on_shed(inputs)`` hears of every request
        shed."""
        self._call = call
        self._max_batch_inputs = max_batch_inputs
        self._max_in_flight = max_in_flight
        self._max_waiting_inputs = max_waiting_inputs
        self._max_wait_s = max_wait_s
        self._on_shed = on_shed
        self._clock = clock
        self._model = model
        self._waiting: deque[_Waiting[R]] = deque()
        self._in_flight = 0
        # the loop holds tasks weakly: a send awaiting a reply nothing else references would
        # be collected mid-call, and its callers would never hear back
        self._sends: set[asyncio.Task[None]] = set()

    @property
    def waiting_inputs(self) -> int:
        return sum(len(w.inputs) for w in self._waiting)

    async def submit(self, envelope: Envelope, inputs: Sequence[Any]) -> R:
        if self._in_flight >= self._max_in_flight and self._max_waiting_inputs is not None:
            self._drop_gone()
            if self.waiting_inputs + len(inputs) > self._max_waiting_inputs:
                self._shed(len(inputs))
                raise Overloaded(self._model, retry_after_s=1)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(envelope, inputs, future, self._clock()))
        if self._in_flight < self._max_in_flight:
            self._send_next()
        return await future

    def _drop_gone(self) -> None:
        """Leave out waiters nobody waits for (cancelled, or past their deadline) and shed
        those that waited ``max_wait_s``."""
        now_s = time.time()
        shed_before = -math.inf if self._max_wait_s is None else self._clock() - self._max_wait_s
        kept: deque[_Waiting[R]] = deque()
        for w in self._waiting:
            if w.future.done():
                continue
            if w.envelope.expired(now_s):
                w.future.set_exception(DeadlineExceeded(self._model, w.envelope.request_id))
                continue
            if w.enqueued_s < shed_before:
                self._shed(len(w.inputs))
                w.future.set_exception(Overloaded(self._model, retry_after_s=1))
                continue
            kept.append(w)
        self._waiting = kept

    def _shed(self, inputs: int) -> None:
        if self._on_shed is not None:
            self._on_shed(inputs)

    def _send_next(self) -> None:
        self._drop_gone()
        # whole requests, as many as fit: the rule the replica's batcher uses too
        taken = plan_batch([len(w.inputs) for w in self._waiting], self._max_batch_inputs)
        if taken == 0:
            return
        group = [self._waiting.popleft() for _ in range(taken)]
        self._in_flight += 1
        send = asyncio.get_running_loop().create_task(self._send(group))
        self._sends.add(send)
        send.add_done_callback(self._sends.discard)

    async def _send(self, group: list[_Waiting[R]]) -> None:
        call = InferCall.join([(w.envelope, w.inputs) for w in group])
        try:
            reply = await self._call(call)
        except BaseException as exc:  # every caller in the group hears the same failure
            # a send stopped from outside (the loop closing) is a retry-able 503 to its
            # callers, never a CancelledError or GeneratorExit raised in their own task
            stopped = ReplicaUnavailable(self._model, "call stopped")
            heard = exc if isinstance(exc, Exception) else stopped
            for w in group:
                if not w.future.done():
                    w.future.set_exception(heard)
            if not isinstance(exc, Exception):
                raise
        else:
            rows = reply.part_rows([len(w.inputs) for w in group])
            for w, part in zip(group, rows, strict=True):
                if w.future.done():
                    continue
                if part is None:  # the replica skipped it: its deadline passed first
                    w.future.set_exception(DeadlineExceeded(self._model, w.envelope.request_id))
                else:
                    w.future.set_result(part)
        finally:
            self._in_flight -= 1
            while self._waiting and self._in_flight < self._max_in_flight:
                self._send_next()
