"""The replica core: one model loaded in a replica, the same for every replica kind.

``load_model`` is the one load-and-warm-up: resolve the store reference, verify every file's
hash, build the engine, load and warm it up (on the engine thread when the replica has one,
since torch wants every call on one thread), and record how long that took. A
``LoadedModel`` is what it gives: the engine, the version, the admission that bounds what
the model takes in, and its metrics.

``RowModel`` adds batching for the models that answer rows (embed, classify): a call's
requests join the batcher's queue under one admission, what expired before the engine runs
is skipped, and each request gets its own rows back. Every embed/classify replica serves
``RowModel``s (a single-model replica is a pool of one, ``serving.replicas.inference``); the
generation replica serves a ``LoadedModel`` of a ``GenerationEngine`` whose continuous
batching runs inside the engine (``serving.replicas.generation``).

    model = load_model(config, store, runner=engine_thread())      # blocks: loads, warms up
    rows = RowModel(model)
    reply = await rows.infer(call)                                  # InferReply
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from models.engines import build_engine
from models.engines.base import Engine
from models.engines.classify import TensorClassifierEngine, TextClassifierEngine
from models.engines.embed import EmbeddingEngine, EmbedResult
from models.store import ModelStore
from serving.config.model import ModelConfig
from serving.messages import (
    ClassifyReply,
    EmbedReply,
    InferCall,
    InferReply,
    InputRefused,
    ModelInfo,
    Rows,
    concat_rows,
)
from serving.monitoring.stats import ModelStats, ReplicaStats
from serving.replicas.admission import Admission
from serving.replicas.batcher import Batcher, BatchPolicy, Expired
from serving.replicas.faults import FaultInjector

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=Engine)

DRAIN_POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Which model a replica loaded: the served name, the store version, the task."""

    name: str
    version: str
    task: str


class LoadedModel(Generic[E]):
    """One model loaded in a replica: its engine, version, admission and stats."""

    def __init__(
        self,
        config: ModelConfig,
        identity: ModelIdentity,
        engine: E,
        runner: ThreadPoolExecutor | None,
        stats: ModelStats,
    ) -> None:
        self.config = config
        self.identity = identity
        self.engine = engine
        self.runner = runner
        """The engine thread (None: the engine runs its own, as generation's does)."""
        self.stats = stats
        """What the replica reports of this model to its node's sidecar."""
        self.admission = Admission(
            config.name,
            config.limits.max_queued,
            on_rejected=lambda units: stats.inc("rejected", units),
        )
        self.faults = (
            FaultInjector(config.name, config.faults, runner)
            if config.faults is not None and runner is not None
            else None
        )

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def version(self) -> str:
        return self.identity.version

    def info(self) -> ModelInfo:
        """What the gateway shows in model metadata."""
        return {
            "name": self.name,
            "version": self.version,
            "task": self.identity.task,
            "dim": getattr(self.engine, "dim", None),
            "max_length": getattr(self.engine, "max_length", None),
        }


def load_model(
    config: ModelConfig,
    store: ModelStore,
    *,
    runner: ThreadPoolExecutor | None,
    stats: ReplicaStats,
    **engine_options: Any,
) -> LoadedModel[Any]:
    """Resolve and verify ``config.source``, build its engine, load and warm it up (on
    ``runner`` when given). Blocks for as long as that takes (seconds): call it from a
    replica's constructor or off its event loop. ``engine_options`` go to the engine; the
    model's stats are kept in ``stats`` under its name and version."""
    started = time.perf_counter()
    resolved = store.open(config.source, task=config.task)
    engine = build_engine(
        resolved.task,
        resolved.path,
        device=config.device,
        devices=config.devices,
        dtype=config.dtype,
        num_threads=config.threads,
        **engine_options,
    )

    def load_and_warm_up() -> None:
        engine.load()
        engine.warmup()

    if runner is None:
        load_and_warm_up()
    else:
        runner.submit(load_and_warm_up).result()
    seconds = time.perf_counter() - started
    model_stats = stats.model(config.name, resolved.version)
    model_stats.set("load_seconds", seconds)
    logger.info("%s: loaded version %s in %.2f s", config.name, resolved.version, seconds)
    identity = ModelIdentity(config.name, resolved.version, resolved.task)
    return LoadedModel(config, identity, engine, runner, model_stats)


@runtime_checkable
class TakesRows(Protocol):
    """An engine that takes feature rows and checks them (a tensor classifier)."""

    input_kind: str

    def check_input(self, batch: np.ndarray) -> None: ...


def check_row_inputs(engine: object, inputs: np.ndarray | list[str]) -> None:
    """``InputRefused`` unless ``inputs`` suit ``engine``: rows its tensor model checks
    (``input_kind`` tensor), else texts. Checked in the replica before admission, though the
    gateway checked against the current version: a canary version may take another shape,
    and a bad request joined into a batch would fail every other request in it."""
    try:
        if isinstance(engine, TakesRows) and engine.input_kind == "tensor":
            engine.check_input(np.asarray(inputs))
        elif not all(isinstance(text, str) for text in inputs):
            kind = "classifier" if hasattr(engine, "input_kind") else "model"
            raise ValueError(f"a text {kind} takes a list of strings")
    except ValueError as exc:
        raise InputRefused(str(exc)) from None


class RowModel:
    """A loaded embed or classify model behind its batcher: ``infer(call)`` -> rows.

    Evicted from a pool (Ray Serve calls ``__del__``, from a worker thread), it takes no new
    calls (``closed``) and stops its batcher once what it admitted is answered.
    """

    def __init__(self, model: LoadedModel[Any]) -> None:
        if model.runner is None:
            raise ValueError(f"model {model.name}: a row model runs on an engine thread")
        self.model = model
        self.closed = False
        # the replica's event loop, where the batcher runs (a replica's constructor has none
        # yet: the first call records it)
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        stats = self.stats = model.stats
        admission = model.admission
        # embed and classify bound the expected wait too; generation's sequences do not queue
        # behind one another the same way (its slots free one at a time)
        wait_ms = model.config.limits.max_queue_wait_ms
        admission.max_wait_s = None if wait_ms is None else wait_ms / 1000.0

        def record(size: int, seconds: float) -> None:
            admission.served(size, seconds)
            stats.observe("batch_size", size)
            stats.observe("engine_seconds", seconds)
            stats.inc("inputs", size)

        batching = model.config.batching
        stats.set("max_batch_size", batching.max_batch_size)
        self.batcher: Batcher[Any, Rows] = Batcher(
            self._run_batch,
            BatchPolicy(
                max_batch_size=batching.max_batch_size, max_wait_s=batching.max_wait_ms / 1000.0
            ),
            admission=model.admission,
            on_batch=record,
            on_expired=lambda inputs: stats.inc("expired", inputs),
            executor=model.runner,
        )

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    def _run_batch(self, inputs: list[Any]) -> Rows:
        """One engine run over the batcher's joined inputs (on the engine thread)."""
        engine = self.model.engine
        if isinstance(engine, EmbeddingEngine):
            result: EmbedResult = engine.run(inputs)
            return EmbedReply(result.vectors, result.token_counts, self.version)
        if isinstance(engine, TensorClassifierEngine):
            # the batcher joins requests row by row: n rows of (64,) -> one (n, 64) array
            return ClassifyReply(engine.run(np.stack(inputs)), self.version)
        return ClassifyReply(engine.run(inputs), self.version)

    async def infer(self, call: InferCall) -> InferReply[Rows]:
        """The rows of every part of ``call`` whose deadline had not passed when the engine
        ran; ``Overloaded`` when admission is full (all parts refused together)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        arrived_s = time.perf_counter()
        check_row_inputs(self.model.engine, call.inputs)
        stats = self.stats
        # in the replica from here: a delay injected below counts as time queued, as it is
        stats.enter(len(call), len(call.parts))
        try:
            if self.model.faults is not None:
                await self.model.faults.apply()
            parts = call.part_inputs()
            futures = self.batcher.submit_parts(
                [
                    (inputs, part.envelope.deadline_s)
                    for inputs, part in zip(parts, call.parts, strict=True)
                ]
            )
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            stats.leave(len(call), len(call.parts))
        # each request of the joined call waited as long
        stats.observe("request_seconds", time.perf_counter() - arrived_s, len(call.parts))
        computed: list[Rows] = []
        skipped: set[int] = set()
        for i, result in enumerate(results):
            if isinstance(result, Expired):
                skipped.add(i)
            elif isinstance(result, BaseException):
                raise result
            else:
                computed.append(result)
        if skipped:
            logger.debug(
                "%s: skipped expired requests %s",
                self.name,
                [call.parts[i].envelope.request_id for i in sorted(skipped)],
            )
        rows = concat_rows(computed) if computed else None
        return InferReply(rows, frozenset(skipped))

    def info(self) -> ModelInfo:
        info = self.model.info()
        engine = self.model.engine
        if isinstance(engine, TensorClassifierEngine | TextClassifierEngine):
            info["input"] = engine.input_kind
            info["features"] = engine.input_features
            info["labels"] = list(engine.labels)
        return info

    def check(self) -> None:
        self.batcher.check()

    def close(self) -> None:
        """Take no new calls; stop the batcher once what it admitted is answered (the engine
        thread is the replica's: it stays)."""
        if self.closed:
            return
        self.closed = True
        loop = self._loop
        if loop is None:  # never called: nothing to drain
            self.batcher.stop()
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: the replica is stopping
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    def __del__(self) -> None:
        self.close()

    async def _drain(self) -> None:
        while self.batcher.admitted_inputs:
            await asyncio.sleep(DRAIN_POLL_S)
        self.batcher.stop()
