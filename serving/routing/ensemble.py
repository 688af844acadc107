"""The scatter/gather ensemble's decisions, as plain functions (no Ray, no asyncio).

The router (``serving.routing.ensemble_router``) scatters one request to every member, gathers what
answers under a deadline, and asks these functions what the answers mean:

- ``combine_probabilities`` / ``combine_embeddings``: one output from the members' outputs;
- ``decide_quorum``: which members answered, failed or timed out, and whether that is enough;
- ``hedge_delay_s``: how long to wait on a member before sending a duplicate request to
  another replica of it, from the policy and the member's observed latencies
  (``LatencyWindow``).

    decision = decide_quorum(("a", "b", "c"), {"a": ANSWERED, "b": ANSWERED,
                                               "c": MemberOutcome("timed_out")}, quorum=2)
    decision.met, decision.partial    # True, True: a partial answer, flagged
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from serving.config.ensemble import ClassifyCombine, HedgePolicy

VOTE_TIE_BREAK = 0.5
"""Weight of the mean probability in a vote: below one vote, so it only breaks ties."""


# ---- combining --------------------------------------------------------------------------------


def combine_probabilities(
    outputs: Mapping[str, np.ndarray],
    how: ClassifyCombine,
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """One (n, classes) probability matrix from the answered members' (n, classes) outputs.

    - ``mean``: the plain average;
    - ``weighted_mean``: the average weighted by ``weights[member]``, renormalised over the
      members that answered (a missing member's weight is not counted);
    - ``vote``: each member votes for its argmax class; a row is the classes' share of the
      votes, with the mean probability worth half a vote as the tie-break:
      ``(votes + 0.5 * mean) / (members + 0.5)``. A one-vote lead (1) always beats the
      tie-break (at most 0.5), and a row still sums to (members + 0.5) / (members + 0.5) = 1.

    Raises ``ValueError`` with no outputs, mismatched shapes, or a weight missing.
    """
    if not outputs:
        raise ValueError("no member outputs to combine")
    names = list(outputs)
    stacked = np.stack([np.asarray(outputs[n], dtype=np.float64) for n in names])  # (M, n, C)
    if stacked.ndim != 3:
        raise ValueError(f"member outputs must be (rows, classes) each, got {stacked.shape[1:]}")
    mean = stacked.mean(axis=0)
    if how == "mean":
        combined = mean
    elif how == "weighted_mean":
        if weights is None or any(n not in weights for n in names):
            raise ValueError(f"weighted_mean needs a weight for each of {names}")
        w = np.array([weights[n] for n in names], dtype=np.float64)
        combined = np.tensordot(w / w.sum(), stacked, axes=1)  # (M,) . (M, n, C) -> (n, C)
    elif how == "vote":
        members, _, classes = stacked.shape
        picks = stacked.argmax(axis=2)  # (M, n): each member's class per row
        votes = np.stack([np.bincount(row, minlength=classes) for row in picks.T])  # (n, C)
        combined = (votes + VOTE_TIE_BREAK * mean) / (members + VOTE_TIE_BREAK)
    else:
        raise ValueError(f"cannot combine probabilities by {how!r}")
    return combined.astype(np.float32)


def combine_embeddings(
    outputs: Mapping[str, np.ndarray], members: Sequence[str], dims: Mapping[str, int]
) -> np.ndarray:
    """Concatenate the members' (n, dim_m) vectors in ``members`` order, then L2-normalise
    each row (so the answer is unit length, as one model's is).

    A member missing from ``outputs`` (timed out or failed, quorum still met) contributes a
    block of zeros ``dims[member]`` wide, so the shape (n, sum of dims) never depends on who
    answered and a vector's coordinates keep their meaning: minilm (384) + a 128-wide model
    -> (n, 512) always, the missing block 0.
    """
    if not outputs:
        raise ValueError("no member outputs to combine")
    rows = len(next(iter(outputs.values())))
    blocks = []
    for member in members:
        if member in outputs:
            block = np.asarray(outputs[member], dtype=np.float32)
            if block.shape[0] != rows:
                raise ValueError(f"member {member} gave {block.shape[0]} rows, not {rows}")
        else:
            block = np.zeros((rows, dims[member]), dtype=np.float32)
        blocks.append(block)
    joined = np.concatenate(blocks, axis=1)
    norms = np.linalg.norm(joined, axis=1, keepdims=True)
    return joined / np.maximum(norms, 1e-12)


# ---- quorum -----------------------------------------------------------------------------------

OutcomeKind = Literal["answered", "failed", "timed_out"]


@dataclass(frozen=True, slots=True)
class MemberOutcome:
    """What became of one member's call: answered, failed (``reason`` says why) or timed out."""

    kind: OutcomeKind
    reason: str = ""


ANSWERED = MemberOutcome("answered")


@dataclass(frozen=True, slots=True)
class GatherDecision:
    """Who answered, and whether that is an answer."""

    answered: tuple[str, ...]
    """Members that answered, in config order."""
    failed: Mapping[str, str]
    """Member -> why it failed (its error)."""
    timed_out: tuple[str, ...]
    """Members with no answer by the deadline (no outcome counts as timed out)."""
    met: bool
    """At least ``quorum`` members answered."""
    partial: bool
    """Quorum met with some members missing: an answer, flagged."""

    def missing_text(self) -> str:
        """``digits-b failed (injected fault); digits-c timed out``: for a 504's message."""
        parts = [f"{m} failed ({why})" for m, why in self.failed.items()]
        parts += [f"{m} timed out" for m in self.timed_out]
        return "; ".join(parts)


def decide_quorum(
    members: Sequence[str], outcomes: Mapping[str, MemberOutcome], quorum: int
) -> GatherDecision:
    """Sort each member by its outcome; quorum is met when ``quorum`` or more answered.

    3 members, 2 answered, quorum 2 -> met, partial; quorum 3 -> not met (a 504 naming the
    third); all 3 answered -> met, not partial.
    """
    if not 1 <= quorum <= len(members):
        raise ValueError(f"quorum must be in 1..{len(members)}, not {quorum}")
    answered, timed_out, failed = [], [], {}
    for member in members:
        outcome = outcomes.get(member, MemberOutcome("timed_out"))
        if outcome.kind == "answered":
            answered.append(member)
        elif outcome.kind == "failed":
            failed[member] = outcome.reason or "error"
        else:
            timed_out.append(member)
    met = len(answered) >= quorum
    return GatherDecision(
        answered=tuple(answered),
        failed=failed,
        timed_out=tuple(timed_out),
        met=met,
        partial=met and len(answered) < len(members),
    )


# ---- hedging ----------------------------------------------------------------------------------


class LatencyWindow:
    """The last ``size`` latencies (seconds) of one member, and their p95.

    window = LatencyWindow(size=100)
    window.add(0.012); window.p95_s()
    """

    def __init__(self, size: int = 200) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def p95_s(self) -> float | None:
        """The 95th percentile (nearest rank) of the window; None when empty.
        20 values 1..20 ms -> rank ceil(0.95 x 20) = 19 -> 19 ms."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[math.ceil(0.95 * len(ordered)) - 1]


def hedge_delay_s(policy: HedgePolicy, latencies: LatencyWindow) -> float | None:
    """Seconds to wait on a member before hedging it; None: never hedge.

    With ``at_p95`` and at least ``min_samples`` latencies seen, the member's p95 (a request
    slower than 95 in 100 is likely a straggler: "The Tail at Scale"); before that, and
    without ``at_p95``, ``after_s``.
    """
    if policy.at_p95 and len(latencies) >= policy.min_samples:
        return latencies.p95_s()
    return policy.after_s
