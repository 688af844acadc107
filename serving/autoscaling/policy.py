"""The autoscaling decision: a pure function of observed signals and the policy's state.

Each signal proposes ``ceil(current x observed / target)`` replicas (one within
``tolerance``, 10 %, of its target proposes ``current``); the proposal is the largest, named
by the signal that made it, clamped to ``[min_replicas, max_replicas]``. A move is
stabilised: up once every proposal for ``upscale_delay_s`` was above ``current`` (to the
lowest of them, the move the whole window agreed to), down once every proposal for
``downscale_delay_s`` was below (to the highest of them), so a load that flaps inside a
window moves nothing. A signal that is missing, or older than ``stale_after_s``, never lets
the count go down (it may still go up on the signals that are fresh). From zero replicas
(``min_replicas: 0``) one starts as soon as a request waits: that request already waits
for a cold start.

    limits = Limits(min_replicas=1, max_replicas=8, upscale_delay_s=5, downscale_delay_s=60)
    queue = Signal("queue_depth", observed=9.0, target=4.0, observed_at_s=now)
    decision = decide(2, [queue], limits, WindowState(), now_s=now)
    decision.desired, decision.reason, decision.state    # 2, "queue_depth", up window opened
    decide(2, [queue], limits, decision.state, now_s=now + 5).desired   # 5 = ceil(2 x 9 / 4)

Signals per model kind (``signal_names``): embed and classify replicas report queue depth
per replica and p95 latency; generation replicas, waiting sequences per replica and KV-cache
use as well. Nothing here reads a metric or talks to Ray: the caller observes, this decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

QUEUE_DEPTH = "queue_depth"
"""Requests queued or in flight per replica, against ``target_queue_depth``."""
LATENCY_P95 = "latency_p95_ms"
"""The p95 of request latency, against the model's ``latency_slo_ms``."""
WAITING_SEQUENCES = "waiting_sequences"
"""Generation: sequences waiting for a slot, per replica."""
KV_CACHE_USE = "kv_cache_use"
"""Generation: the share of the KV cache in use (0..1)."""

FROM_ZERO = "from_zero"
HOLD = "hold"
BOUNDS = "bounds"


def signal_names(task: str) -> tuple[str, ...]:
    """The signals a model of ``task`` is scaled on."""
    if task == "generate":
        return (QUEUE_DEPTH, LATENCY_P95, WAITING_SEQUENCES, KV_CACHE_USE)
    return (QUEUE_DEPTH, LATENCY_P95)


@dataclass(frozen=True)
class Signal:
    """One observed value against its target; ``observed`` None: not reported."""

    name: str
    observed: float | None
    target: float
    observed_at_s: float | None = None

    def __post_init__(self) -> None:
        if not self.target > 0:
            raise ValueError(f"signal {self.name}: target must be > 0, got {self.target}")


@dataclass(frozen=True)
class Limits:
    min_replicas: int
    max_replicas: int
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    tolerance: float = 0.1
    stale_after_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas}..{self.max_replicas}"
            )
        if min(self.upscale_delay_s, self.downscale_delay_s, self.tolerance) < 0:
            raise ValueError("delays and tolerance must not be negative")
        if self.stale_after_s <= 0:
            raise ValueError("stale_after_s must be > 0")

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class WindowState:
    """The open stabilisation window, if any: which way it points (1 up, -1 down, 0 none),
    since when proposals have stayed on that side of the current count, and the lowest (up)
    or highest (down) of them."""

    direction: int = 0
    since_s: float | None = None
    to: int | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    """Replicas to run now."""
    reason: str
    """The signal that made the proposal (or ``hold``, ``from_zero``, ``bounds``)."""
    proposal: int
    """What the fresh signals asked for this time, before stabilisation."""
    state: WindowState
    """To pass to the next call."""
    stale: tuple[str, ...] = ()
    """Signals missing or older than ``stale_after_s``: the count did not go down for them."""


def propose(current: int, signal: Signal, tolerance: float) -> int:
    """``ceil(current x observed / target)``; ``current`` within ``tolerance`` of the target.
    At zero replicas a signal cannot be scaled from: it proposes one if anything is observed."""
    assert signal.observed is not None
    if current == 0:
        return 1 if signal.observed > 0 else 0
    ratio = signal.observed / signal.target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(current * ratio - 1e-9)  # 2 x 6/4 is 3, not 4 by a float's last bit


def decide(
    current: int,
    signals: Sequence[Signal],
    limits: Limits,
    state: WindowState,
    *,
    now_s: float,
    waiting_requests: int = 0,
) -> Decision:
    """The replica count for now, from ``current`` and what ``signals`` observed;
    ``waiting_requests`` is what waits for a first replica while there are none."""
    if current == 0 and waiting_requests > 0:
        desired = limits.clamp(1)
        return Decision(desired, FROM_ZERO, desired, WindowState())
    if limits.clamp(current) != current:  # the bounds changed under us: follow them now
        desired = limits.clamp(current)
        return Decision(desired, BOUNDS, desired, WindowState())

    fresh = [
        s
        for s in signals
        if s.observed is not None
        and s.observed_at_s is not None
        and now_s - s.observed_at_s <= limits.stale_after_s
    ]
    stale = tuple(s.name for s in signals if s not in fresh)
    proposals = {s.name: propose(current, s, limits.tolerance) for s in fresh}
    if proposals:
        reason = max(proposals, key=lambda name: proposals[name])
        proposal = proposals[reason]
    else:
        reason, proposal = HOLD, current
    if stale and proposal < current:  # a signal we cannot see might be the busy one
        reason, proposal = HOLD, current
    proposal = limits.clamp(proposal)
    if proposal == current:
        return Decision(current, HOLD, proposal, WindowState(), stale)

    direction = 1 if proposal > current else -1
    if state.direction == direction and state.since_s is not None and state.to is not None:
        since, agreed = state.since_s, (min if direction > 0 else max)(state.to, proposal)
    else:  # a new window: the other way's (if any) is closed
        since, agreed = now_s, proposal
    delay_s = limits.upscale_delay_s if direction > 0 else limits.downscale_delay_s
    if now_s - since >= delay_s:
        return Decision(agreed, reason, proposal, WindowState(), stale)
    return Decision(current, reason, proposal, WindowState(direction, since, agreed), stale)
