"""The ``faults:`` section of a model entry: delays and errors its replicas inject into their
own calls, on purpose (``serving.replicas.faults`` applies them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FaultsConfig(BaseModel):
    """Faults a model's replicas inject into their own calls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay_ms: float = Field(0.0, ge=0, le=600_000, description="How long a delayed call waits.")
    delay_scope: Literal["call", "replica"] = Field(
        "call",
        description="call: only the delayed call waits (a slow request); replica: the wait "
        "holds the replica's engine thread, so every call queued behind it waits too.",
    )
    delay_probability: float = Field(
        0.0, ge=0, le=1, description="Share of calls delayed by delay_ms (0..1)."
    )
    error_probability: float = Field(
        0.0, ge=0, le=1, description="Share of calls that fail with a 503 instead (0..1)."
    )
    seed: int = Field(0, ge=0, description="Seeds each replica's draws (with its process id).")
