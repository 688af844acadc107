"""The ShardRouter (an ambassador, Burns ch. 4 and 7): callers see one model, the gateway
places each request on one of its shards.

The ring is built from the shards the route table routes now (``m~0`` .. ``m~S-1``), not from
the config: a shard joins the ring only once the reconciler has published it, which it does
only once the shard's app runs, so resharding never sends a request to a shard that cannot
answer. Rings are rebuilt when the table's epoch moves (a few hundred hashes), never per
request.

    router = ShardRouter({"digits-pool": sharding}, table=lambda: follower.table)
    router.entry("digits-pool", "digits-7")     # -> "digits-pool~2": the entry to pick
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from serving.ring import HashRing, build_ring, place
from serving.route_table import NotRouted, RouteTable
from serving.sharding import ShardingConfig, routed_shards, shard_entry


class ShardRouter:
    def __init__(
        self, sharded: Mapping[str, ShardingConfig], table: Callable[[], RouteTable]
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

    def entry(self, model: str, key: str) -> str:
        """The route-table entry that serves ``key`` of ``model``: ``model`` itself when it is
        not sharded, else its shard's entry; ``NotRouted`` while no shard is routed."""
        if model not in self.sharded:
            return model
        ring = self.ring(model)
        if ring is None:
            raise NotRouted(model)
        return shard_entry(model, place(ring, key))

    def shard_map(self, model: str, keys: Iterable[str] = ()) -> dict:
        """What ``GET /v1/admin/shards`` shows of ``model``: each routed shard with its
        version app(s), and where each of ``keys`` (a pool's members) goes."""
        sharding = self.sharded[model]
        table = self._table()
        ring = self.ring(model)
        shards = {}
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


class BoardShardRequests:
    """Resharding requests through the route board actor (``RouteBoard.request_shards``):
    the gateway's admin route asks, the reconciler in ``loom serve`` applies."""

    def __init__(self, board: Any) -> None:
        self._board = board

    async def request(self, model: str, count: int) -> int | None:
        return await self._board.request_shards.remote(model, count)

    async def requested(self) -> dict[str, int]:
        return await self._board.shard_requests.remote()
