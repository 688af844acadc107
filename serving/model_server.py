"""ModelServer: one Ray Serve deployment per model, N replicas (the replicated service, ch. 6).

A replica resolves its store reference, verifies every file's hash, loads the engine and warms
it up in its constructor, so Ray Serve marks it running only once it can answer. Calls join a
bounded admission queue feeding the batcher; a full queue refuses with ``Overloaded`` (the
gateway answers 503 with Retry-After). Each task has its replica class (``SERVER_BY_TASK``):
``ModelServer`` embeds, ``ClassifierServer`` classifies.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.config import RequestRouterConfig

from models.engines import build_engine
from models.engines.embed import EmbedResult
from models.store import ModelStore
from serving import metrics
from serving.batcher import Batcher, BatchPolicy, QueueFull, engine_thread
from serving.config import ModelConfig
from serving.errors import InputRefused, Overloaded
from serving.faults import InjectedFault, fault_for
from serving.generation_server import GenerationServer
from serving.hedge_routing import HedgeAwareRouter
from serving.readiness import model_deployment_name
from serving.request import ClassifyReply, EmbedReply


def split_result(result: EmbedResult, start: int, stop: int) -> EmbedResult:
    return EmbedResult(
        vectors=result.vectors[start:stop], token_counts=result.token_counts[start:stop]
    )


def concat_results(parts: list[EmbedResult]) -> EmbedResult:
    return EmbedResult(
        vectors=np.concatenate([p.vectors for p in parts]),
        token_counts=tuple(c for p in parts for c in p.token_counts),
    )


class ModelReplica:
    """What every task's replica shares: load and warm up on the engine thread, a bounded
    admission queue feeding the batcher, metrics, health, ``info``. Subclasses add their call
    (``embed``, ``classify``) and may say how the batcher runs, cuts and joins rows."""

    def __init__(self, model: dict, models_dir: str) -> None:
        self._config = ModelConfig.model_validate(model)
        name = self._config.name
        started = time.perf_counter()
        resolved = ModelStore(Path(models_dir)).open(self._config.source, task=self._config.task)
        self._version = resolved.version
        self._engine = build_engine(
            resolved.task,
            resolved.path,
            device=self._config.device,
            devices=self._config.devices,
            dtype=self._config.dtype,
            num_threads=self._config.threads,
        )
        runner = engine_thread()
        self._runner = runner
        # faults (config ``faults``): each replica draws its own, so replicas straggle apart
        faults_seed = self._config.faults.seed if self._config.faults else 0
        self._fault_rng = np.random.default_rng([faults_seed, os.getpid()])
        # load, warm up and run on the same thread (see Batcher)
        runner.submit(self._load_and_warm_up).result()
        metrics.MODEL_LOAD.labels(name, resolved.version).set(time.perf_counter() - started)
        self._batch_size = metrics.BATCH_SIZE.labels(name)
        self._batch_latency = metrics.BATCH_LATENCY.labels(name)
        self._inputs = metrics.INPUTS.labels(name)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(name)
        self._rejected = metrics.REJECTED.labels(name)
        batching, limits = self._config.batching, self._config.limits
        self._batcher: Batcher[Any] = Batcher(
            self.run_batch,
            BatchPolicy(
                max_batch_size=batching.max_batch_size,
                max_wait_s=batching.max_wait_ms / 1000.0,
                max_queued=limits.max_queued,
            ),
            split_rows=self.split_rows,
            concat_rows=self.concat_rows,
            on_batch=self._record_batch,
            executor=runner,
        )

    def _load_and_warm_up(self) -> None:
        self._engine.load()
        self._engine.warmup()

    def _record_batch(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._batch_latency.observe(seconds)
        self._inputs.inc(size)

    def run_batch(self, inputs: list[Any]) -> Any:
        """One engine run over the batcher's joined inputs (on the engine thread)."""
        return self._engine.run(inputs)

    @staticmethod
    def split_rows(rows: Any, start: int, stop: int) -> Any:
        return rows[start:stop]

    @staticmethod
    def concat_rows(parts: list[Any]) -> Any:
        return np.concatenate(parts)

    async def _submit(self, inputs: Any) -> Any:
        """Admit ``inputs`` and wait for their rows; a full queue raises ``Overloaded``."""
        await self._inject_fault()
        self._queue_depth.inc(len(inputs))
        try:
            return await self._batcher.submit(inputs)
        except QueueFull as exc:
            self._rejected.inc(len(inputs))
            raise Overloaded(self._config.name, exc.retry_after_s) from None
        finally:
            self._queue_depth.dec(len(inputs))

    async def _inject_fault(self) -> None:
        """Apply ``faults`` to this call (``serving.faults``): an error raises at once; a
        delay waits on this call alone, or (``delay_scope: replica``) holds the engine thread,
        so what queues behind it on this replica waits too."""
        if self._config.faults is None:
            return
        delay_draw, error_draw = self._fault_rng.random(2)
        fault = fault_for(self._config.faults, delay_draw=delay_draw, error_draw=error_draw)
        if fault.error:
            raise InjectedFault(self._config.name)
        if fault.delay_s > 0 and self._config.faults.delay_scope == "call":
            await asyncio.sleep(fault.delay_s)  # a cancelled call (a hedge won) stops waiting
        elif fault.delay_s > 0:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._runner, time.sleep, fault.delay_s)

    def info(self) -> dict:
        """What the gateway shows in model metadata."""
        return {
            "name": self._config.name,
            "version": self._version,
            "task": self._config.task,
            "dim": getattr(self._engine, "dim", None),
            "max_length": getattr(self._engine, "max_length", None),
        }

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica with a dead batcher is unhealthy
        (Serve replaces it)."""
        self._batcher.check()

    def __del__(self) -> None:
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.close()
        metrics.mark_this_process_dead()


class ModelServer(ModelReplica):
    """Serves one embedding model: ``await handle.embed.remote(["a", "b"]) -> EmbedReply``."""

    split_rows = staticmethod(split_result)
    concat_rows = staticmethod(concat_results)

    async def embed(self, texts: list[str]) -> EmbedReply:
        result: EmbedResult = await self._submit(texts)
        return EmbedReply(
            vectors=result.vectors, token_counts=result.token_counts, version=self._version
        )


class ClassifierServer(ModelReplica):
    """Serves one classifier, tensor or text (``info()["input"]`` says which).

    ``await handle.classify.remote(np.zeros((2, 64), np.float32))`` gives a ``ClassifyReply``
    of (2, 10) probabilities; ``handle.classify.remote(["great film"])`` one of (1, labels).
    """

    def run_batch(self, inputs: list[Any]) -> np.ndarray:
        if self._engine.input_kind == "tensor":
            # the batcher joins requests row by row: n rows of (64,) -> one (n, 64) array
            return self._engine.run(np.stack(inputs))
        return self._engine.run(inputs)

    async def classify(self, inputs: np.ndarray | list[str]) -> ClassifyReply:
        check_classifier_inputs(self._engine, inputs)
        probabilities = await self._submit(inputs)
        return ClassifyReply(probabilities=probabilities, version=self._version)

    def info(self) -> dict:
        """Model metadata plus what the gateway checks requests against: the input kind,
        features per row (tensor models) and the label of each output column."""
        return {
            **super().info(),
            "input": self._engine.input_kind,
            "features": self._engine.input_features,
            "labels": list(self._engine.labels),
        }


def check_classifier_inputs(engine: Any, inputs: np.ndarray | list[str]) -> None:
    """``InputRefused`` unless ``inputs`` suit ``engine``. Checked in the replica too, before
    admission: a bad request joined into a batch would fail every other request in it."""
    try:
        if engine.input_kind == "tensor":
            engine.check_input(np.asarray(inputs))
        elif not all(isinstance(text, str) for text in inputs):
            raise ValueError("a text classifier takes a list of strings")
    except ValueError as exc:
        raise InputRefused(str(exc)) from None


SERVER_BY_TASK: dict[str, type] = {
    "embed": ModelServer,
    "classify": ClassifierServer,
    "generate": GenerationServer,
}
"""The replica class that serves each task."""


def model_server_deployment(
    config: ModelConfig, env_vars: dict[str, str], *, server_class: type | None = None
) -> serve.Deployment:
    """The Ray Serve deployment for one model config: its task's replica class (see
    ``SERVER_BY_TASK``) unless ``server_class`` is given, replicas, resources, runtime env."""
    server_class = server_class or SERVER_BY_TASK.get(config.task)
    if server_class is None:
        raise ValueError(f"model {config.name}: task {config.task} is not served yet")
    options: dict = {
        "name": model_deployment_name(config.name),
        # admission is ours (bounded queue -> 503); Ray's own limit only stays out of its way
        "max_ongoing_requests": config.limits.max_queued + 64,
        "ray_actor_options": {
            "num_cpus": config.num_cpus,
            "num_gpus": config.num_gpus,
            "runtime_env": {"env_vars": env_vars},
        },
        # a replica being replaced first finishes what it holds: a generation may stream
        # for a minute or more, a batch of embeddings takes milliseconds
        "graceful_shutdown_timeout_s": 120 if config.task == "generate" else 10,
        "health_check_period_s": 10,
        # Serve's power of two choices, and an ensemble's hedge skips its first call's replica
        "request_router_config": RequestRouterConfig(request_router_class=HedgeAwareRouter),
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.autoscaling.min_replicas,
            "max_replicas": config.autoscaling.max_replicas,
            "target_ongoing_requests": config.autoscaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.replicas or 1
    return serve.deployment(server_class).options(**options)
