"""The ``sharding:`` section of a model entry: how many shards and what places a request
(``serving.routing.sharding`` and ``serving.routing.ring`` do the placing)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SHARDS = 64
DEFAULT_VIRTUAL_NODES = 64
"""Points per shard on the hash ring: the busiest of up to 32 shards holds <= ~1.16x the mean
(``serving.routing.ring``)."""


class ShardingConfig(BaseModel):
    """How a model entry is split into shards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shards: int = Field(
        ge=1,
        le=MAX_SHARDS,
        description="How many shards, each its own replicated deployment (the entry's replicas "
        "or autoscaling apply to each). POST /v1/admin/shards/{name} changes it while serving.",
    )
    key: Literal["model", "header"] = Field(
        "model",
        description="model: place by the called model's name (a pool's members: each shard "
        "loads only its own); header: by the request's X-Loom-Shard-Key (user or session "
        "affinity), the request id when absent.",
    )
    virtual_nodes: int = Field(
        DEFAULT_VIRTUAL_NODES,
        ge=1,
        le=1024,
        description="Points per shard on the hash ring (64: the busiest shard holds <= ~1.2x "
        "the mean).",
    )
