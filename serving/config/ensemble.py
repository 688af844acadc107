"""The ``ensemble:`` section of a model config: a scatter/gather ensemble over served models.

An ensemble entry has no ``source`` and no deployment of its own: the gateway scatters each
request to its members (models of the same config, each served as usual), gathers under a
deadline and a quorum, hedges stragglers and combines (``serving.routing.ensemble_router``).

    models:
      - {name: digits-mlp, source: digits-mlp, task: classify}
      - {name: digits-cnn, source: digits-cnn, task: classify}
      - name: digits
        task: classify
        ensemble:
          members: [digits-mlp, digits-cnn]
          combine: mean
          deadline_ms: 200
          quorum: 1
          hedge_at_p95: true
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ClassifyCombine = Literal["mean", "vote", "weighted_mean"]
EmbedCombine = Literal["concat"]
Combine = Literal["mean", "vote", "weighted_mean", "concat"]
COMBINE_TASK: dict[str, str] = {
    "mean": "classify",
    "vote": "classify",
    "weighted_mean": "classify",
    "concat": "embed",
}
"""The task each way of combining serves: probabilities are averaged or voted, embeddings
concatenated."""

HEDGE_MIN_SAMPLES = 20
"""Latencies a member needs before its observed p95 sets the hedge delay."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgePolicy:
    """When to send a member's duplicate request (``EnsembleConfig`` gives the values)."""

    after_s: float | None = None
    """A fixed wait; with ``at_p95``, the wait until enough latencies are seen."""
    at_p95: bool = False
    """Wait the member's observed p95 latency, once ``min_samples`` are seen."""
    min_samples: int = 20

    @property
    def enabled(self) -> bool:
        """Whether a member may ever be hedged: a fixed wait, or the p95 once known."""
        return self.after_s is not None or self.at_p95


class EnsembleConfig(BaseModel):
    """Members, how their outputs combine, and the deadline, quorum and hedging of a gather."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: tuple[str, ...] = Field(
        min_length=2,
        description="Served names of the member models (at least 2, unique): models of this "
        "config with the ensemble's task, or pool members; not a pool's name, not an ensemble.",
    )
    combine: Combine = Field(
        description="mean, vote or weighted_mean of class probabilities (task classify); "
        "concat of embeddings in member order (task embed)."
    )
    weights: dict[str, float] | None = Field(
        None,
        description="Member -> weight (> 0), one per member; required for weighted_mean and "
        "only for it.",
    )
    deadline_ms: float = Field(
        1000.0,
        gt=0,
        le=600_000,
        description="Longest the gather waits for members (the request's own deadline too, "
        "whichever comes first); members not answered by then count as timed out.",
    )
    quorum: int | None = Field(
        None,
        ge=1,
        description="Members that must answer (1..members); fewer -> 504 naming the ones "
        "missing, at least this many but not all -> a partial answer, flagged. Default: all.",
    )
    hedge_after_ms: float | None = Field(
        None,
        gt=0,
        description="Send a duplicate request to another replica of a member that has not "
        "answered after this long (the first answer wins, the other is cancelled); with "
        "hedge_at_p95, the wait until the member's p95 is known. None: no fixed hedge.",
    )
    hedge_at_p95: bool = Field(
        False,
        description=f"Hedge a member after its observed p95 latency once {HEDGE_MIN_SAMPLES} of "
        "its answers are seen (before that: hedge_after_ms, if set).",
    )

    @field_validator("members")
    @classmethod
    def _members_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({m for m in value if value.count(m) > 1})
        if dupes:
            raise ValueError(f"ensemble members must be unique; repeated: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _weights_and_quorum_fit_members(self) -> EnsembleConfig:
        if self.combine == "weighted_mean":
            if self.weights is None:
                raise ValueError("weights is required for combine weighted_mean")
            if set(self.weights) != set(self.members):
                raise ValueError(
                    f"weights must name each member once: members {list(self.members)}, "
                    f"weights {sorted(self.weights)}"
                )
            bad = {m: w for m, w in self.weights.items() if not 0 < w < float("inf")}
            if bad:
                raise ValueError(f"weights must be > 0: {bad}")
        elif self.weights is not None:
            raise ValueError(f"weights apply to combine weighted_mean only, not {self.combine}")
        if self.quorum is not None and self.quorum > len(self.members):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(self.members)} members")
        return self

    @property
    def needed(self) -> int:
        """Members that must answer: ``quorum``, or all of them."""
        return self.quorum if self.quorum is not None else len(self.members)

    @property
    def hedge_policy(self) -> HedgePolicy:
        after_s = self.hedge_after_ms / 1000.0 if self.hedge_after_ms is not None else None
        return HedgePolicy(after_s=after_s, at_p95=self.hedge_at_p95, min_samples=HEDGE_MIN_SAMPLES)
