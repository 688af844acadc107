"""The e2e tier: ``loom serve`` as a real subprocess, spoken to over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loom_process import (
    ADMIN_KEY,
    API_KEY,
    TEAM_A_KEY,
    TEAM_B_KEY,
    LoomProcess,
    start_loom,
    stop_loom,
)
from model_folders import make_digits_folder, make_tiny_gpt2_folder

from models.settings import LoomEnv
from models.store import ModelStore

_HERE = Path(__file__).parent


_STARTED = pytest.StashKey[dict[str, LoomProcess]]()
"""The session servers started so far, by fixture name (for the hook below)."""


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a session server after the last test that uses it (Ctrl-C, as its fixture's
    teardown would; that teardown then checks what this stop found): an idle server's
    polling loops would take CPU from the tests after it (the other tiers, in a full run)."""
    started = item.config.stash.get(_STARTED, {})
    if not started or _HERE not in Path(item.path).parents:
        return
    items = item.session.items
    later = items[items.index(item) + 1 :]
    for fixture, loom in started.items():
        if not any(fixture in getattr(other, "fixturenames", ()) for other in later):
            stop_loom(loom)


def _start_keyed(
    tmp_path_factory: pytest.TempPathFactory, port: int, grpc_port: int
) -> LoomProcess:
    home = tmp_path_factory.mktemp("e2e-keys")
    store = ModelStore(LoomEnv.from_environ({"LOOM_HOME": str(home)}).models_dir)
    store.register("digits", make_digits_folder(tmp_path_factory.mktemp("d")), task="classify")
    store.set_alias("digits", "serving", "1")
    tinygpt = make_tiny_gpt2_folder(tmp_path_factory.mktemp("tinygpt"), n_positions=1024)
    store.register("tinygpt", tinygpt, task="generate")
    config = {
        "server": {
            "grpc_port": grpc_port,
            "api_keys": ["config-key-0123456789"],
            "admin_api_keys": [ADMIN_KEY],
            "keys": [
                {"name": "team-a", "key": TEAM_A_KEY, "scopes": ["infer", "jobs"]},
                {"name": "team-b", "key": TEAM_B_KEY, "scopes": ["jobs"]},
            ],
        },
        "models": [
            {"name": "minilm", "source": "minilm", "task": "embed"},
            {"name": "digits", "source": "digits", "task": "classify",
             "replicas": 1, "num_cpus": 0.5, "torch_threads": 1},
            {"name": "tinygpt", "source": "tinygpt", "task": "generate",
             "replicas": 1, "num_cpus": 0.5, "torch_threads": 1,
             "generation": {"max_sequences": 2, "stream_interval_ms": 0}},
        ],
        "rollout": {"poll_interval_s": 0.2, "drain_timeout_s": 5},
        # the test's webhook receiver listens on 127.0.0.1, which must be allowed explicitly
        "training": {"tick_s": 0.2, "webhook_allowed_networks": ["127.0.0.1/32"]},
    }  # fmt: skip
    loom = start_loom(home, port, config, env={"LOOM_API_KEYS": API_KEY})
    loom.grpc_port = grpc_port
    return loom


@pytest.fixture(scope="session")
def loom_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    free_port: Callable[[], int],
) -> Iterator[LoomProcess]:
    """The embedded default (no config file), API keys off. Its teardown is the check that
    Ctrl-C stops the server and Ray with it: exit 0, no process of its group left."""
    loom = start_loom(tmp_path_factory.mktemp("e2e-open"), free_port())
    request.config.stash.setdefault(_STARTED, {})["loom_server"] = loom
    try:
        yield loom
    finally:
        code, leftovers = stop_loom(loom)
        assert code == 0, loom.log_tail()
        assert "shutting down" in loom.log_tail()
        assert not leftovers, "processes of the server's group outlived it"


@pytest.fixture(scope="session")
def keyed_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    free_port: Callable[[], int],
) -> Iterator[LoomProcess]:
    """API keys on (``API_KEY`` from the environment, ``config-key-0123456789`` from the
    file), serving ``minilm``, ``digits`` (version 1: untrained weights, ~10% right) and
    ``tinygpt`` (a tiny GPT-2 with two sequence slots) with the job scheduler: the auth,
    training and generation tests share it (one server start, not three)."""
    loom = _start_keyed(tmp_path_factory, free_port(), free_port())
    request.config.stash.setdefault(_STARTED, {})["keyed_server"] = loom
    try:
        yield loom
    finally:
        code, leftovers = stop_loom(loom)
        assert not leftovers, "a process of the server outlived it"
