"""PoolServer: many small variants of one family share replicas (Ray Serve model multiplexing).

A model config with ``multiplex`` is a pool: one deployment whose replicas load members on
demand. The gateway calls the pool with ``handle.options(multiplexed_model_id="digits-a@2")``;
Serve routes the call to a replica that holds that member when one does, and the replica's
``@serve.multiplexed`` loader keeps at most ``max_models_per_replica`` members loaded, evicting
the least recently used. Why: a tiny digits classifier as its own deployment costs a replica
process (~457 MiB, ~4.6 s to start, measured on 2 cores), where loading it into a running
replica takes ~3 ms.

Each loaded member has its own batcher (admission and batching as in ``ClassifierServer``);
every member's engine loads, warms up and runs on the replica's one engine thread.

    deployment = pool_server_deployment(pool_config, env_vars)   # what the reconciler deploys
    reply = await handle.options(multiplexed_model_id="digits-a@2").classify.remote(rows)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.config import RequestRouterConfig

from models.engines import build_engine
from models.engines.base import Engine
from models.store import ModelStore
from serving import metrics
from serving.batcher import Batcher, BatchPolicy, QueueFull, engine_thread
from serving.config import ModelConfig
from serving.errors import Overloaded
from serving.model_server import (
    check_classifier_inputs,
    concat_results,
    model_server_deployment,
    split_result,
)
from serving.request import ClassifyReply, EmbedReply
from serving.rollout import POOL_VERSION

DRAIN_POLL_S = 0.01


class LoadedModel:
    """One member loaded in a pool replica: its engine and its batcher.

    Evicted (Ray Serve calls ``__del__``, from a worker thread), it takes no new calls
    (``closed``) and stops its batcher once what it admitted is answered."""

    def __init__(
        self, name: str, version: str, engine: Engine, batcher: Batcher[Any], task: str
    ) -> None:
        self.name = name
        self.version = version
        self.engine = engine
        self.batcher = batcher
        self.task = task
        self.closed = False
        self._loop = asyncio.get_running_loop()

    def info(self) -> dict:
        info = {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "dim": getattr(self.engine, "dim", None),
            "max_length": getattr(self.engine, "max_length", None),
        }
        if self.task == "classify":
            info |= {
                "input": self.engine.input_kind,
                "features": self.engine.input_features,
                "labels": list(self.engine.labels),
            }
        return info

    def __del__(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: the replica is stopping
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        while self.batcher.queued_inputs:
            await asyncio.sleep(DRAIN_POLL_S)
        self.batcher.stop()  # the engine thread is the replica's: it stays


class PoolReplica:
    """A replica of a pool. ``pool_server_class(n)`` adds the ``@serve.multiplexed`` loader
    ``get_model`` (Serve fixes ``n`` when the method is decorated)."""

    def __init__(self, model: dict, models_dir: str) -> None:
        self._config = ModelConfig.model_validate(model)
        if self._config.multiplex is None:
            raise ValueError(f"model {self._config.name} is not a pool (no multiplex)")
        self._members = self._config.multiplex.members  # name -> pinned ref
        self._store = ModelStore(Path(models_dir))
        self._runner = engine_thread()  # every member's engine loads and runs here
        self._loaded: dict[str, LoadedModel] = {}

    async def get_model(self, ref: str) -> LoadedModel:  # replaced by pool_server_class
        raise NotImplementedError

    async def load_member(self, ref: str) -> LoadedModel:
        """Resolve and verify ``ref`` in the store, then build, load and warm its engine, all
        off the event loop (a cache miss of the multiplexed loader)."""
        name = next((n for n, r in self._members.items() if r == ref), None)
        if name is None:
            raise ValueError(f"{ref} is not a member of pool {self._config.name}")
        started = time.perf_counter()
        resolved = await asyncio.to_thread(self._store.open, ref, task=self._config.task)
        engine = build_engine(
            resolved.task,
            resolved.path,
            device=self._config.device,
            devices=self._config.devices,
            dtype=self._config.dtype,
            num_threads=self._config.threads,
        )
        await asyncio.get_running_loop().run_in_executor(self._runner, _load_and_warm_up, engine)
        metrics.MODEL_LOADS.labels(name).inc()
        metrics.MODEL_LOAD.labels(name, resolved.version).set(time.perf_counter() - started)
        batcher = self._batcher(name, engine)
        model = LoadedModel(name, resolved.version, engine, batcher, resolved.task)
        self._loaded[name] = model
        return model

    def _batcher(self, name: str, engine: Engine) -> Batcher[Any]:
        batch_size = metrics.BATCH_SIZE.labels(name)
        batch_latency = metrics.BATCH_LATENCY.labels(name)
        inputs = metrics.INPUTS.labels(name)

        def record(size: int, seconds: float) -> None:
            batch_size.observe(size)
            batch_latency.observe(seconds)
            inputs.inc(size)

        def run_batch(rows: list[Any]) -> Any:
            if self._config.task == "classify" and engine.input_kind == "tensor":
                return engine.run(np.stack(rows))  # n rows of (64,) -> one (n, 64) array
            return engine.run(rows)

        embeds = self._config.task == "embed"
        batching, limits = self._config.batching, self._config.limits
        return Batcher(
            run_batch,
            BatchPolicy(
                max_batch_size=batching.max_batch_size,
                max_wait_s=batching.max_wait_ms / 1000.0,
                max_queued=limits.max_queued,
            ),
            split_rows=split_result if embeds else None,
            concat_rows=concat_results if embeds else np.concatenate,
            on_batch=record,
            executor=self._runner,
        )

    async def _model(self) -> LoadedModel:
        """The member this call names, loaded; an evicted one is loaded again."""
        ref = serve.get_multiplexed_model_id()
        if not ref:
            raise ValueError(f"a call to pool {self._config.name} names its member")
        for _ in range(3):
            model = await self.get_model(ref)
            if not model.closed:
                return model
        raise RuntimeError(f"{ref} was evicted as fast as it loaded")

    async def _submit(self, model: LoadedModel, inputs: Any) -> Any:
        queue_depth = metrics.QUEUE_DEPTH.labels(model.name)
        queue_depth.inc(len(inputs))
        try:
            return await model.batcher.submit(inputs)
        except QueueFull as exc:
            metrics.REJECTED.labels(model.name).inc(len(inputs))
            raise Overloaded(model.name, exc.retry_after_s) from None
        finally:
            queue_depth.dec(len(inputs))

    async def classify(self, inputs: np.ndarray | list[str]) -> ClassifyReply:
        model = await self._model()
        check_classifier_inputs(model.engine, inputs)
        probabilities = await self._submit(model, inputs)
        return ClassifyReply(probabilities=probabilities, version=model.version)

    async def embed(self, texts: list[str]) -> EmbedReply:
        model = await self._model()
        result = await self._submit(model, texts)
        return EmbedReply(
            vectors=result.vectors, token_counts=result.token_counts, version=model.version
        )

    async def info(self) -> dict:
        """The named member's metadata; with no member named, the pool's."""
        if serve.get_multiplexed_model_id():
            return (await self._model()).info()
        return {
            "name": self._config.name,
            "version": POOL_VERSION,
            "task": self._config.task,
            "members": dict(self._members),
            # what this replica holds now: a shard of a pool keyed by model holds its own
            "loaded": sorted(n for n, m in self._loaded.items() if not m.closed),
        }

    def check_health(self) -> None:
        """A loaded member whose batcher died makes the replica unhealthy (Serve replaces it)."""
        for name, model in list(self._loaded.items()):
            if model.closed:
                del self._loaded[name]
            else:
                model.batcher.check()

    def __del__(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.shutdown(wait=False, cancel_futures=True)
        metrics.mark_this_process_dead()


def _load_and_warm_up(engine: Engine) -> None:
    engine.load()
    engine.warmup()


def pool_server_class(max_models_per_replica: int) -> type[PoolReplica]:
    """A ``PoolReplica`` whose ``get_model`` is Serve's multiplexed loader, holding at most
    ``max_models_per_replica`` members (least recently used evicted first)."""

    class PoolServer(PoolReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, ref: str) -> LoadedModel:
            return await self.load_member(ref)

    return PoolServer


def pool_server_deployment(config: ModelConfig, env_vars: dict[str, str]) -> serve.Deployment:
    """The Ray Serve deployment of one pool: replicas, resources and runtime env as for any
    model (``model_server_deployment``), the pool's replica class."""
    if config.multiplex is None:
        raise ValueError(f"model {config.name} is not a pool (no multiplex)")
    loaded_at_once = min(len(config.multiplex.models), config.multiplex.max_models_per_replica)
    return model_server_deployment(
        config, env_vars, server_class=pool_server_class(config.multiplex.max_models_per_replica)
    ).options(
        # admission is per member (each batcher's bounded queue); Ray's limit stays out of it
        max_ongoing_requests=config.limits.max_queued * loaded_at_once + 64,
        # Serve's own router: its FIFO matching hands a free replica holding a member to a
        # request for that member. HedgeAwareRouter routes out of order, and a 4-replica pool
        # of 24 members loaded 16 times in a 20 s run against 1 (benchmarks.sharding)
        request_router_config=RequestRouterConfig(),
    )
