"""The embed/classify replica: ``infer(call)`` over the ``RowModel``s it holds (ch. 6).

A plain model's replica is a pool of one: it loads its model in its constructor (resolve,
verify, load, warm up: Ray Serve marks it running only once it can answer) and answers every
call with it. A pool's replica (config ``multiplex``) starts empty and loads members on
demand: the gateway calls it with ``handle.options(multiplexed_model_id="digits-a@2")``,
Serve routes the call to a replica that holds that member when one does, and the replica's
``@serve.multiplexed`` loader keeps at most ``max_models_per_replica`` members loaded,
evicting the least recently used. Why pools: a tiny digits classifier as its own deployment
costs a replica process (~457 MiB, ~4.6 s to start, measured on 2 cores), where loading it
into a running replica takes ~3 ms.

Every model a replica holds loads, warms up and runs on the replica's one engine thread.

    reply = await handle.infer.remote(InferCall.join([(envelope, ["hello"])]))
    reply = await handle.options(multiplexed_model_id="digits-a@2").infer.remote(call)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ray import serve

from models.store import ModelStore
from serving.config.model import ModelConfig, PoolConfig, parse_entry
from serving.config.pool import POOL_VERSION
from serving.messages import InferCall, InferReply, ModelInfo, Rows
from serving.monitoring.sidecar_actor import ReplicaMonitoring, report_to_sidecar
from serving.monitoring.stats import replica_stats
from serving.replica_logging import route_to_serve_log
from serving.replicas.batcher import engine_thread
from serving.replicas.core import RowModel, load_model

EVICTED_RETRIES = 3


class InferenceReplica:
    """The replica of an embed or classify model, or of a pool of them. Deploy a pool's with
    ``pool_replica_class(n)``, which adds the multiplexed loader."""

    def __init__(
        self,
        model: dict[str, Any],
        models_dir: str,
        monitoring: ReplicaMonitoring | None = None,
    ) -> None:
        """``monitoring``: where the replica reports its stats (None: kept in ``stats``
        only, for a replica built outside a server)."""
        route_to_serve_log()
        config = parse_entry(model)
        if not isinstance(config, ModelConfig | PoolConfig) or config.task == "generate":
            raise ValueError(f"model {config.name} is not an embed or classify model or pool")
        self._config = config
        self._store = ModelStore(Path(models_dir))
        self._runner = engine_thread()  # every model's engine loads and runs here
        self._loaded: dict[str, RowModel] = {}
        self._only: RowModel | None = None
        self.stats = replica_stats("rows")
        if isinstance(config, ModelConfig):  # a pool of one, loaded now
            self._only = RowModel(
                load_model(config, self._store, runner=self._runner, stats=self.stats)
            )
        # from here on the node's sidecar sees this replica (once loaded: ready to serve)
        self._reporter = report_to_sidecar(self.stats, monitoring)

    async def get_model(self, ref: str) -> RowModel:  # replaced by pool_replica_class
        raise NotImplementedError

    async def load_member(self, ref: str) -> RowModel:
        """Resolve, verify, load and warm up pool member ``ref``, off the event loop (a
        cache miss of the multiplexed loader)."""
        pool = self._config
        assert isinstance(pool, PoolConfig)
        name = next((n for n, r in pool.members.items() if r == ref), None)
        if name is None:
            raise ValueError(f"{ref} is not a member of pool {pool.name}")
        loaded = await asyncio.to_thread(
            load_model, pool.member(name), self._store, runner=self._runner, stats=self.stats
        )
        loaded.stats.inc("model_loads")
        model = RowModel(loaded)
        self._loaded[name] = model
        return model

    async def _model(self) -> RowModel:
        """The model this call is for: the replica's one, or the pool member the call names
        (loaded; an evicted one is loaded again)."""
        if self._only is not None:
            return self._only
        ref = serve.get_multiplexed_model_id()
        if not ref:
            raise ValueError(f"a call to pool {self._config.name} names its member")
        for _ in range(EVICTED_RETRIES):
            model = await self.get_model(ref)
            if not model.closed:
                return model
        raise RuntimeError(f"{ref} was evicted as fast as it loaded")

    async def infer(self, call: InferCall) -> InferReply[Rows]:
        """The rows of each part of ``call`` (``serving.messages``)."""
        return await (await self._model()).infer(call)

    async def info(self) -> ModelInfo:
        """The model's metadata; for a pool, the named member's, or with none named the
        pool's own (its members, and which this replica holds now)."""
        if self._only is not None or serve.get_multiplexed_model_id():
            return (await self._model()).info()
        pool = self._config
        assert isinstance(pool, PoolConfig)
        return {
            "name": pool.name,
            "version": POOL_VERSION,
            "task": pool.task,
            "members": dict(pool.members),
            # what this replica holds now: a shard of a pool keyed by model holds its own
            "loaded": sorted(n for n, m in self._loaded.items() if not m.closed),
        }

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a model whose batcher died makes the replica
        unhealthy (Serve replaces it)."""
        if self._only is not None:
            self._only.check()
        for name, model in list(self._loaded.items()):
            if model.closed:
                del self._loaded[name]
            else:
                model.check()

    def __del__(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.shutdown(wait=False, cancel_futures=True)
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.close()


def pool_replica_class(max_models_per_replica: int) -> type[InferenceReplica]:
    """An ``InferenceReplica`` whose ``get_model`` is Serve's multiplexed loader, holding at
    most ``max_models_per_replica`` members (least recently used evicted first)."""

    class PoolReplica(InferenceReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, ref: str) -> RowModel:
            return await self.load_member(ref)

    return PoolReplica
