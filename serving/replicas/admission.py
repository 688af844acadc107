"""Bounded admission for a replica's model: at most ``limit`` units (inputs for embed and
classify, sequences for generation) admitted at once, and, with ``max_wait_s``, no more than
the engine clears in that long at its measured drain rate; past either a call is refused with
``Overloaded`` and a Retry-After of how long the admitted units take to drain.

Refusing at the door is the replica's overload rule (shed, don't collapse): the queue behind
an engine never grows past what it clears in ``min(limit / throughput, max_wait_s)``, so under
any arrival rate an admitted input waits a bounded time and the rest are told to come back.

    admission = Admission("minilm", limit=1024)
    admission.admit(32)         # or raises Overloaded(retry_after_s=...)
    ...
    admission.release(32)       # done (answered, failed or dropped): room again
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from serving.messages import Overloaded


def retry_after_s(queued: int, per_s: float) -> int:
    """Seconds until the queue has likely drained: 600 queued at 300/s -> 2 s; at least 1."""
    if per_s <= 0:
        return 1
    return max(1, math.ceil(queued / per_s))


def share_refusal(
    *,
    prompts: int,
    n: int,
    tokens: int,
    max_tokens: int | None,
    max_queued: int,
    max_queued_tokens: int,
    share: float,
    context_length: int,
) -> str | None:
    """Why one generation call may not be admitted at all (it takes more than ``share`` of a
    replica's budget: ``max_queued`` sequences, ``max_queued_tokens`` tokens); None when it
    may. ``tokens``: the call's prompt tokens plus ``max_tokens`` per sequence, summed.

    64 prompts x n 16 = 1024 sequences > 0.5 x 1024 = 512 -> refused; one sequence, and one
    full context of tokens, always fit whatever the share (else a small budget refuses all).
    """
    sequences = prompts * n
    allowed_sequences = max(1, int(share * max_queued))
    shape = f"{prompts} prompts x n {n}"
    if sequences > allowed_sequences:
        return (
            f"{shape} = {sequences} sequences, more than one request may take "
            f"({allowed_sequences}: generation.max_request_share {share:g} of the replica's "
            f"limits.max_queued {max_queued}); send fewer prompts or a smaller n"
        )
    allowed_tokens = max(context_length, int(share * max_queued_tokens))
    if tokens > allowed_tokens:
        shown = "max_tokens" if max_tokens is None else f"max_tokens {max_tokens}"
        return (
            f"{shape} x (prompt tokens + {shown}) = {tokens} tokens, more than one request "
            f"may take ({allowed_tokens}: generation.max_request_share {share:g} of the "
            f"replica's generation.max_queued_tokens {max_queued_tokens}); send fewer prompts, "
            "a smaller n or a smaller max_tokens"
        )
    return None


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

    def __init__(
        self,
        model: str,
        limit: int,
        *,
        max_wait_s: float | None = None,
        on_rejected: Callable[[int], object] | None = None,
    ) -> None:
        """``max_wait_s``: refuse a call whose last unit would wait longer than this for the
        admitted ones ahead of it to be served (once ``served`` has measured the engine; a
        lone call is always taken). ``on_rejected`` hears of every refusal, with its units
        (the replica's stats count them)."""
        self.model = model
        self.limit = limit
        self.max_wait_s = max_wait_s
        self.admitted = 0
        self._drained = RateMeter(half_life_s=5.0)
        self._service_per_s = 0.0
        self._on_rejected = on_rejected

    def served(self, units: int, seconds: float) -> None:
        """The engine ran ``units`` in ``seconds``: its rate while busy (a moving average),
        which idle time does not lower, unlike the drain rate."""
        if units <= 0 or seconds <= 0:
            return
        rate = units / seconds
        weight = 0.2 if self._service_per_s else 1.0
        self._service_per_s += weight * (rate - self._service_per_s)

    def admit(self, units: int) -> None:
        """Take ``units`` or refuse them all: ``Overloaded`` when they do not fit."""
        if self.admitted + units > self.limit or self._would_wait_too_long(units):
            if self._on_rejected is not None:
                self._on_rejected(units)
            raise Overloaded(self.model, retry_after_s(self.admitted, self._drained.rate()))
        self.admitted += units

    def expected_wait_s(self, units: int) -> float:
        """How long the last of ``units`` would wait, admitted now: everything ahead of it
        served at the engine's measured rate (0 with nothing ahead; inf before any run)."""
        if self.admitted == 0:
            return 0.0
        if self._service_per_s <= 0:
            return math.inf
        return (self.admitted + units) / self._service_per_s

    def _would_wait_too_long(self, units: int) -> bool:
        if self.max_wait_s is None or self.admitted == 0:
            return False
        wait_s = self.expected_wait_s(units)
        return wait_s > self.max_wait_s and wait_s != math.inf

    def release(self, units: int) -> None:
        """``units`` are done; they count toward the drain rate."""
        self.admitted -= units
        self._drained.add(units)
