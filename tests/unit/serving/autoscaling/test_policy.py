"""The autoscaling decision (issue 14, point 2) as table tests: a load step up and down,
flapping held off by the windows, missing and stale signals, scale to zero and from zero,
each signal deciding. A hand-fed clock: ``now_s`` is an argument."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from serving.autoscaling.policy import (
    FROM_ZERO,
    HOLD,
    KV_CACHE_USE,
    LATENCY_P95,
    QUEUE_DEPTH,
    WAITING_SEQUENCES,
    Decision,
    Limits,
    Signal,
    WindowState,
    decide,
    propose,
    signal_names,
)

LIMITS = Limits(min_replicas=1, max_replicas=10, upscale_delay_s=5, downscale_delay_s=30)


def queue(observed: float | None, at: float = 0.0, target: float = 4.0) -> Signal:
    return Signal(QUEUE_DEPTH, observed, target, None if observed is None else at)


def run(
    current: int,
    steps: Sequence[tuple[float, Sequence[Signal]]],
    limits: Limits = LIMITS,
) -> list[int]:
    """The replica count after each (time, signals) step, carrying the state and applying
    each decision."""
    state, counts = WindowState(), []
    for now_s, signals in steps:
        decision = decide(current, signals, limits, state, now_s=now_s)
        current, state = decision.desired, decision.state
        counts.append(current)
    return counts


@pytest.mark.parametrize(
    ("current", "observed", "target", "proposed"),
    [
        (2, 8.0, 4.0, 4),  # twice the target: twice the replicas
        (2, 9.0, 4.0, 5),  # rounded up
        (2, 6.0, 4.0, 3),  # exactly 3, not 4 by a float's last bit
        (4, 2.0, 4.0, 2),  # half: half
        (4, 4.3, 4.0, 4),  # within 10 %: stay
        (4, 3.7, 4.0, 4),
        (4, 4.5, 4.0, 5),  # past 10 %: move
        (3, 0.0, 4.0, 0),  # idle: as few as the bounds allow
        (0, 0.5, 4.0, 1),  # at zero anything observed asks for one
        (0, 0.0, 4.0, 0),
    ],
)
def test_a_signal_proposes_current_times_observed_over_target(
    current: int, observed: float, target: float, proposed: int
) -> None:
    assert propose(current, Signal(QUEUE_DEPTH, observed, target, 0.0), 0.1) == proposed


def test_a_load_step_up_scales_after_the_upscale_delay_and_down_after_the_downscale_delay() -> None:
    busy, idle = 12.0, 1.0  # queue depth per replica against a target of 4
    steps = [(t, [queue(busy, t)]) for t in (0, 2, 4, 5, 6)]  # 3 x target from 2 replicas
    counts = run(2, steps)
    assert counts == [2, 2, 2, 6, 6]  # up at 5 s, to ceil(2 x 12 / 4)
    # at 6 replicas the load drops to a quarter: down only after 30 s of it
    steps = [(t, [queue(idle, t)]) for t in (10, 20, 39.9, 40, 41)]
    assert run(6, steps) == [6, 6, 6, 2, 2]  # ceil(6 x 1 / 4) = 2


def test_flapping_inside_a_window_moves_nothing() -> None:
    steps = [(t, [queue(12.0 if n % 2 == 0 else 4.0, t)]) for n, t in enumerate(range(0, 20))]
    assert set(run(2, steps)) == {2}  # up and "stay" alternate: every window is cut short
    steps = [(t, [queue(1.0 if n % 2 == 0 else 4.0, t)]) for n, t in enumerate(range(0, 120, 2))]
    assert set(run(6, steps)) == {6}


def test_an_up_window_takes_the_lowest_proposal_it_saw_and_a_down_window_the_highest() -> None:
    steps = [(0, [queue(16.0, 0)]), (2, [queue(8.0, 2)]), (5, [queue(20.0, 5)])]
    assert run(2, steps)[-1] == 4  # 8, 4, 10 proposed: 4, what every moment agreed to
    steps = [(0, [queue(1.0, 0)]), (10, [queue(2.0, 10)]), (30, [queue(0.0, 30)])]
    assert run(8, steps)[-1] == 4  # 2, 4, 1 (clamped) proposed: 4


@pytest.mark.parametrize(
    "signals",
    [[], [queue(None)], [queue(0.5, at=-31.0)]],
    ids=["no-signal", "missing", "stale"],
)
def test_a_missing_or_stale_signal_never_scales_down(signals: list[Signal]) -> None:
    steps = [(t, signals) for t in (0, 30, 60, 90)]
    assert run(5, steps) == [5, 5, 5, 5]


def test_a_stale_signal_does_not_stop_a_fresh_one_scaling_up() -> None:
    stale_latency = Signal(LATENCY_P95, 10.0, 200.0, observed_at_s=-100.0)
    decision = None
    state = WindowState()
    for now_s in (0, 5):
        decision = decide(2, [queue(8.0, now_s), stale_latency], LIMITS, state, now_s=now_s)
        state = decision.state
    assert isinstance(decision, Decision)
    assert (decision.desired, decision.reason, decision.stale) == (4, QUEUE_DEPTH, (LATENCY_P95,))


def test_with_one_signal_stale_an_idle_fresh_one_does_not_scale_down() -> None:
    stale_latency = Signal(LATENCY_P95, 10.0, 200.0, observed_at_s=-100.0)
    steps = [(t, [queue(0.0, t), stale_latency]) for t in (0, 30, 60)]
    assert run(4, steps) == [4, 4, 4]


def test_scale_to_zero_and_from_zero() -> None:
    to_zero = Limits(min_replicas=0, max_replicas=4, upscale_delay_s=5, downscale_delay_s=30)
    steps = [(t, [queue(0.0, t)]) for t in (0, 15, 30)]
    assert run(1, steps, to_zero) == [1, 1, 0]
    # at zero, a waiting request starts one replica at once, with no upscale delay
    decision = decide(0, [queue(0.0, 40)], to_zero, WindowState(), now_s=40, waiting_requests=1)
    assert (decision.desired, decision.reason) == (1, FROM_ZERO)
    # nothing waiting: zero stays zero
    assert decide(0, [queue(0.0, 40)], to_zero, WindowState(), now_s=40).desired == 0
    # with min_replicas 1 the count never reaches zero
    assert run(1, steps) == [1, 1, 1]


@pytest.mark.parametrize(
    ("signal", "deciding"),
    [
        (Signal(LATENCY_P95, 600.0, 200.0, 0.0), LATENCY_P95),  # 3 x the SLO
        (Signal(WAITING_SEQUENCES, 6.0, 2.0, 0.0), WAITING_SEQUENCES),
        (Signal(KV_CACHE_USE, 0.9, 0.3, 0.0), KV_CACHE_USE),
    ],
)
def test_each_signal_can_decide(signal: Signal, deciding: str) -> None:
    signals = [queue(4.0, 0.0), signal]  # the queue at its target: only the other asks more
    first = decide(2, signals, LIMITS, WindowState(), now_s=0)
    later = decide(2, signals, LIMITS, first.state, now_s=5)
    assert (later.desired, later.reason) == (6, deciding)


def test_the_bounds_hold_and_a_changed_bound_is_followed_at_once() -> None:
    steps = [(t, [queue(400.0, t)]) for t in (0, 5)]
    assert run(2, steps)[-1] == LIMITS.max_replicas
    tight = Limits(min_replicas=3, max_replicas=4)
    assert decide(8, [], tight, WindowState(), now_s=0).desired == 4
    assert decide(1, [], tight, WindowState(), now_s=0).desired == 3


def test_holding_steady_says_hold() -> None:
    decision = decide(3, [queue(4.0, 0)], LIMITS, WindowState(), now_s=0)
    assert (decision.desired, decision.reason, decision.state) == (3, HOLD, WindowState())


def test_generation_models_scale_on_their_sequences_and_cache_too() -> None:
    assert signal_names("embed") == (QUEUE_DEPTH, LATENCY_P95)
    assert set(signal_names("generate")) == {
        QUEUE_DEPTH,
        LATENCY_P95,
        WAITING_SEQUENCES,
        KV_CACHE_USE,
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": 0, "max_replicas": 0},
        {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": -1},
        {"min_replicas": 1, "max_replicas": 2, "stale_after_s": 0},
    ],
)
def test_limits_that_cannot_hold_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="must|need"):
        Limits(**bad)
