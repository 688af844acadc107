"""The sharded service (Burns ch. 7): one model entry served as S shards, each its own
replicated (and autoscalable) Ray Serve application, with a consistent-hash ring
(``serving.ring``) placing every request by a key.

Two keys, chosen by ``sharding.key``:

- ``model``: the name the client calls. For a pool of many small models (``multiplex``) each
  shard then loads only the members the ring gives it: 20 digits variants over 4 shards is
  ~5 per shard, within a replica's ``max_models_per_replica`` where one shard would evict.
- ``header``: the request's ``X-Loom-Shard-Key`` (a user, a session), for cache affinity; a
  request without one goes where its request id hashes (spread evenly).

Shard k of model ``m`` is routed as the entry ``m~k`` (``~`` is outside the model-name
alphabet) and runs as the app ``loom.m~k@<version>``; the rollout (``serving.rollout``) moves,
drains and deletes each shard like any model. Resharding S -> S+1 starts the new shard and
changes the ring only once the new shard runs: requests in flight finish where they are, the
keys the new ring moves (~1/(S+1)) go to the new shard from then on, and nothing fails.

    sharding = ShardingConfig(shards=4, key="model")
    entry = shard_entry("digits-pool", "2")                # "digits-pool~2"
    parse_shard_entry(entry)                               # ("digits-pool", "2")
    shard_key(sharding, model="digits-7", header=None, request_id="r1")   # "digits-7"
"""

from __future__ import annotations

from collections.abc import Mapping

from serving.config.sharding import ShardingConfig

SHARD_SEPARATOR = "~"
SHARD_KEY_HEADER = "x-loom-shard-key"


def shard_entry(model: str, shard: str) -> str:
    """The route-table entry (and app model name) of one shard: ``m~k``."""
    return f"{model}{SHARD_SEPARATOR}{shard}"


def parse_shard_entry(entry: str) -> tuple[str, str] | None:
    """``"m~k"`` -> ``("m", "k")``; None for an entry that is not a shard."""
    model, sep, shard = entry.rpartition(SHARD_SEPARATOR)
    return (model, shard) if sep and model and shard else None


def base_model(entry: str) -> str:
    """The model entry a route-table entry belongs to: ``m~k`` -> ``m``, ``m`` -> ``m``."""
    parsed = parse_shard_entry(entry)
    return parsed[0] if parsed else entry


def shard_key(sharding: ShardingConfig, *, model: str, header: str | None, request_id: str) -> str:
    """The key a request is placed by: the called model's name, or the shard-key header (the
    request id when the client sent none, so keyless traffic spreads over every shard)."""
    if sharding.key == "model":
        return model
    return header if header else request_id


def routed_shards(model: str, entries: Mapping[str, object]) -> tuple[str, ...]:
    """The shard ids of ``model`` among the route table's entries, in numeric order:
    ``{"m~1", "m~0", "n"}`` -> ``("0", "1")``."""
    ids = [
        parsed[1]
        for entry in entries
        if (parsed := parse_shard_entry(entry)) is not None and parsed[0] == model
    ]
    return tuple(sorted(ids, key=lambda s: (len(s), s)))
