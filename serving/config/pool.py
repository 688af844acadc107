"""The ``multiplex:`` section of a pool entry: many small variants of one family sharing
replicas (Ray Serve model multiplexing), and what a pool's member is."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.errors import InvalidModelRef
from models.refs import ModelRef

POOL_VERSION = "pool"
"""The one version a multiplexed pool is routed and deployed as (``loom.<pool>@pool``): its
members are pinned refs resolved at start, so the pool itself never moves."""


def parse_ref(value: str) -> ModelRef:
    """A store reference, or ``ValueError`` (which pydantic reports against the field)."""
    try:
        return ModelRef.parse(value)
    except InvalidModelRef as exc:
        raise ValueError(str(exc)) from None


class MultiplexConfig(BaseModel):
    """Many small variants of one family sharing replicas (Ray Serve model multiplexing).

    A replica loads a member on its first request and keeps at most ``max_models_per_replica``
    of them, evicting the least recently used. A digits classifier costs ~457 MiB and ~4.6 s
    as a replica of its own here, ~3 ms to load into one that runs already.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] = Field(
        min_length=1,
        description="Pinned store refs of the members, NAME@VERSION (e.g. digits-a@2); clients "
        "call each by its store name (digits-a). Resolved at start: members do not follow "
        "aliases yet.",
    )
    max_models_per_replica: int = Field(
        8, ge=1, le=1024, description="Most members one replica holds loaded (LRU eviction)."
    )

    @field_validator("models")
    @classmethod
    def _members_pinned_and_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for text in value:
            ref = parse_ref(text)
            if ref.version is None:
                raise ValueError(f"pool member {text} must be pinned: NAME@VERSION")
            names.append(ref.name)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool members must be unique; repeated: {', '.join(dupes)}")
        return value

    @property
    def members(self) -> dict[str, str]:
        """Member name -> its pinned ref: ``{"digits-a": "digits-a@2"}``."""
        return {ModelRef.parse(ref).name: ref for ref in self.models}


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One callable member of a multiplexed pool."""

    name: str
    """What clients call it: the store name of ``ref``."""
    ref: str
    """The pinned store ref its replica loads (the multiplexed model id)."""
    pool: str
    """The pool's config name: the one routed entry, deployment and app."""
