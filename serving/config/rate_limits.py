"""``server.rate_limits``: requests per second per route family, off by default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RateLimit(BaseModel):
    """One route family's token bucket, per client: ``burst`` requests at once, refilled at
    ``rate_per_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: float = Field(gt=0, description="Requests per second a client may sustain.")
    burst: int = Field(
        ge=1, description="Requests a client may make at once before the rate applies."
    )


class RateLimitsConfig(BaseModel):
    """A bucket per client and route family; a family left out (the default) is unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    infer: RateLimit | None = Field(
        None,
        description="Inference routes: /v1/embeddings, /v1/completions, /v1/chat/completions "
        "and /v2/models/.../infer. null: no limit.",
    )
    jobs: RateLimit | None = Field(
        None, description="The /v1/jobs routes (submit, list, read, cancel). null: no limit."
    )
    max_clients: int = Field(
        100_000,
        ge=1,
        description="Buckets kept per family; past it the least recently used is dropped (a "
        "dropped bucket starts full again).",
    )
