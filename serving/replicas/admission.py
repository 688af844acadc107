"""Bounded admission for a replica's model: at most ``limit`` units (inputs for embed and
classify, sequences for generation) admitted at once; past that a call is refused with
``Overloaded`` and a Retry-After of how long the admitted units take to drain, measured.

Refusing at the door is the replica's overload rule (shed, don't collapse): the queue behind
an engine never grows past what it clears in ``limit / throughput`` seconds.

    admission = Admission("minilm", limit=1024)
    admission.admit(32)         # or raises Overloaded(retry_after_s=...)
    ...
    admission.release(32)       # done (answered, failed or dropped): room again
"""

from __future__ import annotations

import math
import time

from prometheus_client import Counter

from serving.messages import Overloaded


def retry_after_s(queued: int, per_s: float) -> int:
    """Seconds until the queue has likely drained: 600 queued at 300/s -> 2 s; at least 1."""
    if per_s <= 0:
        return 1
    return max(1, math.ceil(queued / per_s))


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


class Admission:
    """Counts admitted units against ``limit``; its drain rate sets the Retry-After."""

    def __init__(self, model: str, limit: int, *, rejected: Counter | None = None) -> None:
        """``rejected`` (a labelled counter child) counts the units refused."""
        self.model = model
        self.limit = limit
        self.admitted = 0
        self._drained = RateMeter(half_life_s=5.0)
        self._rejected = rejected

    def admit(self, units: int) -> None:
        """Take ``units`` or refuse them all: ``Overloaded`` when they do not fit."""
        if self.admitted + units > self.limit:
            if self._rejected is not None:
                self._rejected.inc(units)
            raise Overloaded(self.model, retry_after_s(self.admitted, self._drained.rate()))
        self.admitted += units

    def release(self, units: int) -> None:
        """``units`` are done; they count toward the drain rate."""
        self.admitted -= units
        self._drained.add(units)
