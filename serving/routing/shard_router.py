"""The ShardRouter (an ambassador, Burns ch. 4 and 7): callers see one model, the gateway
places each request on one of its shards.

The ring is built from the shards the route table routes now (``m~0`` .. ``m~S-1``), not from
the config: a shard joins the ring only once the reconciler has published it, which it does
only once the shard's app runs, so resharding never sends a request to a shard that cannot
answer. Rings are rebuilt when the table's epoch moves (a few hundred hashes), never per
request.

    router = ShardRouter({"digits-pool": sharding}, table=lambda: follower.table)
    router.entry("digits-pool", "digits-7")     # -> "digits-pool~2": the entry to pick

The router reads the route table through ``RoutedTable``, the two attributes it needs, so
routing knows nothing of the rollout that publishes the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from serving.config.sharding import ShardingConfig
from serving.routing.ring import HashRing, build_ring, place
from serving.routing.sharding import routed_shards, shard_entry


class RoutedVersion(Protocol):
    @property
    def version(self) -> str: ...

    @property
    def weight(self) -> float: ...

    @property
    def app_name(self) -> str: ...


class RoutedTable(Protocol):
    """The route table as the shard router reads it (``rollout.route_table.RouteTable``)."""

    @property
    def epoch(self) -> int: ...

    @property
    def routes(self) -> Mapping[str, Sequence[RoutedVersion]]: ...


class ShardRouter:
    def __init__(
        self, sharded: Mapping[str, ShardingConfig], table: Callable[[], RoutedTable]
    ) -> None:
        """``sharded``: model entry -> its sharding; ``table``: the gateway's route table now."""
        self.sharded = dict(sharded)
        self._table = table
        self._rings: dict[str, tuple[int, HashRing | None]] = {}  # model -> (epoch, ring)

    def ring(self, model: str) -> HashRing | None:
        """The ring over ``model``'s routed shards; None while none is routed."""
        table = self._table()
        cached = self._rings.get(model)
        if cached is not None and cached[0] == table.epoch:
            return cached[1]
        shards = routed_shards(model, table.routes)
        ring = build_ring(shards, self.sharded[model].virtual_nodes) if shards else None
        self._rings[model] = (table.epoch, ring)
        return ring

    def entry(self, model: str, key: str) -> str | None:
        """The route-table entry that serves ``key`` of ``model``: ``model`` itself when it is
        not sharded, else its shard's entry; None while no shard is routed."""
        if model not in self.sharded:
            return model
        ring = self.ring(model)
        if ring is None:
            return None
        return shard_entry(model, place(ring, key))

    def shard_map(self, model: str, keys: Iterable[str] = ()) -> dict[str, Any]:
        """What ``GET /v1/admin/shards`` shows of ``model``: each routed shard with its
        version app(s), and where each of ``keys`` (a pool's members) goes."""
        sharding = self.sharded[model]
        table = self._table()
        ring = self.ring(model)
        shards: dict[str, dict[str, Any]] = {}
        for shard in routed_shards(model, table.routes):
            routes = table.routes[shard_entry(model, shard)]
            shards[shard] = {
                "versions": {r.version: r.weight for r in routes},
                "apps": [r.app_name for r in routes],
                "keys": [],
            }
        if ring is not None:
            for key in keys:
                shards[place(ring, key)]["keys"].append(key)
        return {
            "model": model,
            "key": sharding.key,
            "virtual_nodes": sharding.virtual_nodes,
            "routed_shards": len(shards),
            "epoch": table.epoch,
            "shards": shards,
        }
