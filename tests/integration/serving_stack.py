"""One Loom server for the serving integration modules: every module's models side by side in
one config and one model store, started once per session (each start of a ``LoomServer`` is
20-40 s of this tier's time; one for all modules instead of one each).

A module adds its models with one entry in ``ENTRIES``: a function that makes its model
folders, registers them in the shared store and returns its ``models`` config entries. Served
names and store names must not clash with another entry's (``build_config`` refuses a served
name twice). A module that moves a store alias (a promotion) uses store models of its own, so
no other module sees the move and no test depends on the order of the modules::

    def sharded_models(store: ModelStore, workdir: Path) -> list[dict[str, Any]]:
        store.register("shardy", make_digits_folder(workdir / "shardy"), task="classify")
        return [{"name": "shardy", "source": "shardy", "task": "classify", **SMALL}]

    ENTRIES = (..., sharded_models)

Its tests take the ``serving_stack`` fixture (``tests/integration/conftest.py``) and call
``serving_stack.running()`` for the URL and the store. Replicas are small (``SMALL``: a quarter
of a logical CPU, one torch thread); the session Ray has ``RAY_CPUS`` logical CPUs (conftest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_folders import make_digits_folder, make_text_classifier_folder, make_tiny_gpt2_folder

from models.bundled import bundled_model_dir
from models.settings import LoomEnv
from models.store import SERVING_ALIAS, ModelStore
from serving.config import LoomConfig, parse_config
from serving.server import LoomServer

SMALL: dict[str, Any] = {"replicas": 1, "num_cpus": 0.25, "torch_threads": 1}
"""One replica on a quarter of a logical CPU with one torch thread: what most models need."""

ModelEntry = Callable[[ModelStore, Path], list[dict[str, Any]]]
"""Registers a module's models in the store (folders made under the given folder) and returns
its ``models`` config entries."""


# ---- test_classifier_serving.py ---------------------------------------------------------

CLASSIFY_MAX_ROWS = 16
SENTIMENT_LABELS = ("negative", "neutral", "positive")


def classifier_models(store: ModelStore, workdir: Path) -> list[dict[str, Any]]:
    """A digits CNN (a tensor model) and a tiny text model; ``digits-tight`` has a tiny queue,
    to see admission refuse."""
    store.register("digits", make_digits_folder(workdir / "digits", arch="cnn"), task="classify")
    text = make_text_classifier_folder(workdir / "sentiment", labels=SENTIMENT_LABELS)
    store.register("sentiment", text, task="classify")
    small = {"task": "classify", **SMALL}
    return [
        {
            "name": "digits",
            "source": "digits",
            "batching": {"max_batch_size": 64, "max_wait_ms": 5},
            "limits": {"max_inputs": CLASSIFY_MAX_ROWS},
            **small,
        },
        {"name": "digits-tight", "source": "digits", "limits": {"max_queued": 2}, **small},
        {"name": "sentiment", "source": "sentiment", **small},
    ]


# ---- test_pool_serving.py ---------------------------------------------------------------

POOL_MEMBERS = {"digits-a": "digits-a@1", "digits-b": "digits-b@2", "digits-c": "digits-c@1"}
"""Served member name -> the store version the pool pins for it."""


def pool_models(store: ModelStore, workdir: Path) -> list[dict[str, Any]]:
    """Three digits variants in one replica that holds at most two. ``digits-b`` has two
    versions: the pool pins @2, so answering with @1 would show."""
    for seed, (name, version) in enumerate(
        [("digits-a", "1"), ("digits-b", "1"), ("digits-b", "2"), ("digits-c", "1")], start=1
    ):
        folder = make_digits_folder(workdir / f"{name}-{version}", seed=seed)
        assert store.register(name, folder, task="classify").version == version
    multiplex = {"models": list(POOL_MEMBERS.values()), "max_models_per_replica": 2}
    return [{"name": "digits-pool", "task": "classify", "multiplex": multiplex, **SMALL}]


# ---- test_replicated_embeddings.py ------------------------------------------------------


def embedding_models(store: ModelStore, workdir: Path) -> list[dict[str, Any]]:
    """The bundled MiniLM (registered by the server itself) on two replicas, and ``tight``:
    a tiny queue, to see admission refuse."""
    return [
        {
            "name": "minilm",
            "source": "minilm",
            **SMALL,
            "replicas": 2,
            "batching": {"max_batch_size": 32, "max_wait_ms": 5},
        },
        {"name": "tight", "source": "minilm", "limits": {"max_queued": 2}, **SMALL},
    ]


# ---- test_rollout_under_load.py ---------------------------------------------------------

ROLLOUT_MODEL = "rollout-minilm"
"""A store model of the rollout tests' own (the bundled files, twice: version 2 is version 1
registered again), so promoting it moves nothing another module serves."""


def rollout_models(store: ModelStore, workdir: Path) -> list[dict[str, Any]]:
    """``rollout-minilm`` follows its serving alias (at 1 until a test promotes 2); ``canary``
    splits its traffic between the two versions."""
    for _ in range(2):
        store.register(ROLLOUT_MODEL, bundled_model_dir(), task="embed")
    store.set_alias(ROLLOUT_MODEL, SERVING_ALIAS, "1")
    return [
        {"name": ROLLOUT_MODEL, "source": ROLLOUT_MODEL, **SMALL},
        {"name": "canary", "source": ROLLOUT_MODEL, "traffic": {"1": 50, "2": 50}, **SMALL},
    ]


# ---- test_generation_serving.py ---------------------------------------------------------

GENERATION_CONTEXT = 1024
"""Room for long generations: 1000 tokens of the tiny model take a few seconds."""


def generation_models(store: ModelStore, workdir: Path) -> list[dict[str, Any]]:
    """A tiny GPT-2 with four sequence slots, following its serving alias (at 1: a test
    registers and promotes version 2). Its tests use ``minilm`` as the non-generate model."""
    folder = make_tiny_gpt2_folder(workdir / "tinygpt", n_positions=GENERATION_CONTEXT)
    store.register("tinygpt", folder, task="generate")
    store.set_alias("tinygpt", SERVING_ALIAS, "1")
    return [
        {
            "name": "tinygpt",
            "source": "tinygpt",
            "task": "generate",
            **SMALL,
            "generation": {"max_sequences": 4},
        }
    ]


# ---- test_sharded_serving.py ------------------------------------------------------------

# ---- test_sharded_serving.py ------------------------------------------------------------

SHARDED_POOL = "sharded-pool"
MEMBERS = [f"shardy-{i}" for i in range(8)]
SESSIONS = "digits-sessions"


def sharded_models(store: ModelStore, workdir: Path) -> list[dict[str, Any]]:
    """Eight digits variants in a pool of 2 shards keyed by member name, each shard's replica
    able to hold all eight (so what it holds is exactly what was routed to it); and one digits
    model in 2 shards keyed by header."""
    small = {"task": "classify", **SMALL}
    for seed, name in enumerate(MEMBERS, start=100):
        store.register(name, make_digits_folder(workdir / name, seed=seed), task="classify")
    store.register(SESSIONS, make_digits_folder(workdir / SESSIONS, seed=7), task="classify")
    multiplex = {"models": [f"{n}@1" for n in MEMBERS], "max_models_per_replica": 8}
    return [
        {
            "name": SHARDED_POOL,
            "multiplex": multiplex,
            "sharding": {"shards": 2, "key": "model"},
            **small,
        },
        {
            "name": SESSIONS,
            "source": SESSIONS,
            "sharding": {"shards": 2, "key": "header"},
            **small,
        },
    ]


ENTRIES: tuple[ModelEntry, ...] = (
    classifier_models,
    pool_models,
    embedding_models,
    rollout_models,
    generation_models,
    sharded_models,
)


def without_wait_budget(model: dict[str, Any]) -> dict[str, Any]:
    """The model with no wait budget (``limits.max_queue_wait_ms: null``) unless it sets one:
    the budget sheds by the engine's measured speed, so with it a test's concurrent requests
    would pass or be shed depending on how busy the machine is. The budget's own tests
    (unit tier, ``benchmarks.faults``) set it."""
    if "source" not in model:  # an ensemble: its members carry the limits
        return model
    limits = model.get("limits", {})
    return model | {"limits": {"max_queue_wait_ms": None} | limits}


def build_config(
    store: ModelStore,
    workdir: Path,
    port: int,
    entries: tuple[ModelEntry, ...] = ENTRIES,
    grpc_port: int | None = None,
) -> LoomConfig:
    """Every entry's models registered in ``store``, in one config serving on ``port`` (and
    the v2 protocol over gRPC on ``grpc_port``)."""
    models: list[dict[str, Any]] = []
    for entry in entries:
        folder = workdir / entry.__name__
        folder.mkdir(parents=True, exist_ok=True)
        models += entry(store, folder)
    names = [model["name"] for model in models]
    twice = sorted({name for name in names if names.count(name) > 1})
    assert not twice, f"served names used by more than one entry: {twice}"
    models = [without_wait_budget(model) for model in models]
    return parse_config(
        {
            "training": {"enabled": False},  # serving alone: no job scheduler
            # the session's Ray is already running: the proxy path (e2e covers direct)
            "server": {"port": port, "ingress": "proxy", "grpc_port": grpc_port},
            "rollout": {"poll_interval_s": 0.2},
            "models": models,
        }
    )


@dataclass(frozen=True)
class Stack:
    """The running shared server."""

    url: str
    loom: LoomServer
    store: ModelStore
    config: LoomConfig
    grpc_target: str
    """``127.0.0.1:PORT`` of the gateway's gRPC server (``tritonclient.grpc``'s target)."""

    def served_names(self) -> set[str]:
        """Every name a client can call: each model's, a pool's members in place of the pool."""
        return set(self.config.served_names())


class SharedStack:
    """Starts the shared server on first use and stops it when told (conftest stops it as soon
    as the next test does not use it, so a module with a server of its own, or the training
    tests, get the session's Ray to themselves; a later user starts it again)."""

    def __init__(self, home: Path, free_port: Callable[[], int]) -> None:
        self._home = home
        self._free_port = free_port
        self._env = LoomEnv.from_environ({"LOOM_HOME": str(home)})
        self._store = ModelStore(self._env.models_dir)
        self._config: LoomConfig | None = None
        self._stack: Stack | None = None
        self.starts = 0

    @property
    def is_running(self) -> bool:
        return self._stack is not None

    def running(self) -> Stack:
        if self._stack is not None:
            return self._stack
        port, grpc_port = self._free_port(), self._free_port()
        if self._config is None:  # the models are registered once, for every start
            workdir = self._home / "src"
            self._config = build_config(self._store, workdir, port, grpc_port=grpc_port)
        else:
            server = self._config.server.model_copy(update={"port": port, "grpc_port": grpc_port})
            self._config = self._config.model_copy(update={"server": server})
        loom = LoomServer(self._config, self._env)
        self.starts += 1
        try:
            loom.start(ready_timeout_s=600)
        except BaseException:
            loom.stop()
            raise
        url = f"http://127.0.0.1:{port}"
        self._stack = Stack(url, loom, self._store, self._config, f"127.0.0.1:{grpc_port}")
        return self._stack

    def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.loom.stop()
