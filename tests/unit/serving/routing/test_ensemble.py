"""The ensemble's pure parts: combining, the quorum decision, the hedge delay, and the
injected-fault decision. Plain values, no cluster."""

from __future__ import annotations

import numpy as np
import pytest

from serving.replicas.faults import NO_FAULT, Fault, FaultsConfig, fault_for
from serving.routing.ensemble import (
    ANSWERED,
    HedgePolicy,
    LatencyWindow,
    MemberOutcome,
    combine_embeddings,
    combine_probabilities,
    decide_quorum,
    hedge_delay_s,
)

# one row, three classes: a and b lean to class 0, c to class 2
A = np.array([[0.6, 0.3, 0.1]])
B = np.array([[0.5, 0.1, 0.4]])
C = np.array([[0.1, 0.2, 0.7]])


@pytest.mark.parametrize(
    ("outputs", "how", "weights", "expected"),
    [
        # (0.6+0.5+0.1)/3 = 0.4, (0.3+0.1+0.2)/3 = 0.2, (0.1+0.4+0.7)/3 = 0.4
        ({"a": A, "b": B, "c": C}, "mean", None, [0.4, 0.2, 0.4]),
        # weights 2:1:1 -> (2*0.6 + 0.5 + 0.1)/4 = 0.45, (0.6+0.1+0.2)/4 = 0.225, 0.325
        ({"a": A, "b": B, "c": C}, "weighted_mean", {"a": 2, "b": 1, "c": 1}, [0.45, 0.225, 0.325]),
        # c missing: weights renormalised over a and b, 2:1 -> (1.2+0.5)/3, (0.6+0.1)/3, 0.6/3
        ({"a": A, "b": B}, "weighted_mean", {"a": 2, "b": 1, "c": 5}, [1.7 / 3, 0.7 / 3, 0.2]),
        # votes 2, 0, 1 of 3; mean 0.4, 0.2, 0.4 -> (2 + 0.2)/3.5, (0 + 0.1)/3.5, (1 + 0.2)/3.5
        ({"a": A, "b": B, "c": C}, "vote", None, [2.2 / 3.5, 0.1 / 3.5, 1.2 / 3.5]),
    ],
)
def test_combining_probabilities_gives_the_worked_row(outputs, how, weights, expected):
    combined = combine_probabilities(outputs, how, weights)

    assert combined.shape == (1, 3)
    assert np.allclose(combined[0], expected, atol=1e-6)
    assert np.isclose(combined.sum(), 1.0, atol=1e-6)  # still a distribution


def test_a_vote_tie_goes_to_the_class_with_the_higher_mean_probability():
    # a votes class 0, c votes class 2: one vote each; mean of class 2 = (0.1+0.7)/2 = 0.4 >
    # mean of class 0 = (0.6+0.1)/2 = 0.35, so class 2 wins the tie
    combined = combine_probabilities({"a": A, "c": C}, "vote")

    assert combined[0].argmax() == 2
    # (1 + 0.5 * 0.4) / 2.5 = 0.48 against (1 + 0.5 * 0.35) / 2.5 = 0.47
    assert np.allclose(combined[0, [0, 2]], [0.47, 0.48], atol=1e-6)


def test_a_one_vote_lead_beats_any_mean_probability():
    # two members vote class 1 with 0.34; one votes class 0 with certainty
    shy = np.array([[0.33, 0.34, 0.33]])
    sure = np.array([[1.0, 0.0, 0.0]])
    combined = combine_probabilities({"a": shy, "b": shy, "c": sure}, "vote")

    # class 1: (2 + 0.5 * 0.227) / 3.5 = 0.604; class 0: (1 + 0.5 * 0.553) / 3.5 = 0.365
    assert combined[0].argmax() == 1


def test_combining_refuses_missing_weights_and_no_outputs():
    with pytest.raises(ValueError, match="weight"):
        combine_probabilities({"a": A, "b": B}, "weighted_mean", {"a": 1.0})
    with pytest.raises(ValueError, match="no member outputs"):
        combine_probabilities({}, "mean")


def test_concatenated_embeddings_keep_member_order_and_unit_length():
    a = np.array([[1.0, 0.0]], dtype=np.float32)
    b = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)

    joined = combine_embeddings({"b": b, "a": a}, ["a", "b"], {"a": 2, "b": 3})

    # [1, 0] + [0, 0, 1] -> [1, 0, 0, 0, 1], length sqrt(2) -> each 1 becomes 1/sqrt(2)
    assert np.allclose(joined, [[2**-0.5, 0, 0, 0, 2**-0.5]], atol=1e-6)


def test_a_missing_member_leaves_a_block_of_zeros_so_the_shape_holds():
    a = np.array([[0.6, 0.8]], dtype=np.float32)

    joined = combine_embeddings({"a": a}, ["a", "b"], {"a": 2, "b": 3})

    assert joined.shape == (1, 5)  # 2 + 3 wide, whoever answered
    assert np.allclose(joined, [[0.6, 0.8, 0, 0, 0]], atol=1e-6)  # |[0.6, 0.8]| = 1 already


TIMED_OUT = MemberOutcome("timed_out")
FAULT = MemberOutcome("failed", "injected fault")


@pytest.mark.parametrize(
    ("outcomes", "quorum", "met", "partial", "answered"),
    [
        ({"a": ANSWERED, "b": ANSWERED, "c": ANSWERED}, 3, True, False, ("a", "b", "c")),
        ({"a": ANSWERED, "b": ANSWERED, "c": TIMED_OUT}, 2, True, True, ("a", "b")),
        ({"a": ANSWERED, "b": ANSWERED, "c": TIMED_OUT}, 3, False, False, ("a", "b")),
        ({"a": ANSWERED, "b": FAULT, "c": ANSWERED}, 2, True, True, ("a", "c")),
        ({"a": ANSWERED, "b": FAULT}, 2, False, False, ("a",)),  # c has no outcome: timed out
        ({"a": FAULT, "b": FAULT, "c": TIMED_OUT}, 1, False, False, ()),
    ],
)
def test_quorum_is_met_by_enough_answers_and_partial_when_some_are_missing(
    outcomes, quorum, met, partial, answered
):
    decision = decide_quorum(("a", "b", "c"), outcomes, quorum)

    assert (decision.met, decision.partial, decision.answered) == (met, partial, answered)


def test_the_decision_names_each_missing_member_and_why():
    decision = decide_quorum(("a", "b", "c"), {"a": ANSWERED, "b": FAULT}, quorum=3)

    assert decision.failed == {"b": "injected fault"}
    assert decision.timed_out == ("c",)
    assert decision.missing_text() == "b failed (injected fault); c timed out"


def test_a_quorum_outside_one_to_members_is_refused():
    with pytest.raises(ValueError, match="1..3"):
        decide_quorum(("a", "b", "c"), {}, quorum=4)


def window_of(ms: list[float]) -> LatencyWindow:
    window = LatencyWindow(size=100)
    for value in ms:
        window.add(value / 1000)
    return window


TWENTY = [float(i) for i in range(1, 21)]  # 1..20 ms


@pytest.mark.parametrize(
    ("policy", "latencies_ms", "expected_s"),
    [
        (HedgePolicy(), TWENTY, None),  # no policy: never hedge
        (HedgePolicy(after_s=0.05), TWENTY, 0.05),  # fixed
        # p95 of 1..20 ms: nearest rank ceil(0.95 * 20) = 19 -> 19 ms
        (HedgePolicy(after_s=0.05, at_p95=True, min_samples=20), TWENTY, 0.019),
        # 19 samples < 20: the fallback
        (HedgePolicy(after_s=0.05, at_p95=True, min_samples=20), TWENTY[:19], 0.05),
        (HedgePolicy(at_p95=True, min_samples=20), TWENTY[:19], None),
    ],
)
def test_the_hedge_delay_is_the_fixed_wait_or_the_observed_p95_once_known(
    policy, latencies_ms, expected_s
):
    delay = hedge_delay_s(policy, window_of(latencies_ms))

    assert delay == pytest.approx(expected_s) if expected_s is not None else delay is None


def test_the_latency_window_keeps_only_the_newest_values():
    window = LatencyWindow(size=3)
    for seconds in (9.0, 1.0, 2.0, 3.0):  # 9 s falls out
        window.add(seconds)

    assert (len(window), window.p95_s()) == (3, 3.0)  # ceil(0.95 * 3) = 3rd of [1, 2, 3]


@pytest.mark.parametrize(
    ("faults", "delay_draw", "error_draw", "expected"),
    [
        (None, 0.0, 0.0, NO_FAULT),
        (FaultsConfig(delay_ms=200, delay_probability=0.05), 0.0499, 0.9, Fault(delay_s=0.2)),
        (FaultsConfig(delay_ms=200, delay_probability=0.05), 0.05, 0.9, NO_FAULT),
        (FaultsConfig(error_probability=0.5), 0.9, 0.49, Fault(error=True)),
        # an erroring call fails at once, without the delay
        (
            FaultsConfig(delay_ms=200, delay_probability=1, error_probability=1),
            0.0,
            0.0,
            Fault(error=True),
        ),
        (FaultsConfig(delay_ms=0, delay_probability=1), 0.0, 0.9, NO_FAULT),
    ],
)
def test_a_call_is_delayed_or_fails_when_its_draw_falls_below_the_probability(
    faults, delay_draw, error_draw, expected
):
    assert fault_for(faults, delay_draw=delay_draw, error_draw=error_draw) == expected


def test_a_delay_waits_on_the_call_alone_unless_the_replica_scope_is_chosen() -> None:
    assert FaultsConfig(delay_ms=100, delay_probability=0.05).delay_scope == "call"
    stalled = FaultsConfig(delay_ms=100, delay_probability=0.05, delay_scope="replica")
    assert stalled.delay_scope == "replica"
    with pytest.raises(ValueError, match="delay_scope"):
        FaultsConfig(delay_ms=100, delay_scope="node")
