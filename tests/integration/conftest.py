"""The integration tier: one local Ray for the whole session, shut down at its end, and one
shared Loom server on it for the serving modules (``serving_stack.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from serving_stack import SharedStack

RAY_CPUS = 6
"""Logical CPUs of the session Ray: the shared server's replicas (11 x 0.25, and a rollout's
new version beside its old one), and once it has stopped, the training tests' workers."""

_STACK = pytest.StashKey["SharedStack"]()
_HERE = Path(__file__).parent


def _uses_stack(item: pytest.Item) -> bool:
    return "serving_stack" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Within this tier, the tests on the shared server first (each module's order kept),
    then the rest: one start of it, not one per run of its users between other modules (a
    module with a server of its own, e.g. test_ensemble_serving.py, sorts between them). The
    other tiers' tests keep their places."""
    slots = [i for i, item in enumerate(items) if _HERE in Path(item.path).parents]
    here = [items[i] for i in slots]
    ordered = [item for item in here if _uses_stack(item)]
    ordered += [item for item in here if not _uses_stack(item)]
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import os

    import ray

    from serving.server import ray_serve_env

    for key, value in ray_serve_env().items():  # the settings `loom serve` runs with
        os.environ.setdefault(key, value)
    ray.init(
        num_cpus=RAY_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"worker_niceness": 0},
    )
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_running(ray_session: None) -> Iterator[None]:
    """Serve started on the session's Ray, no HTTP proxy (the module's apps are called by
    handle), and shut down after the module."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def serving_stack(
    request: pytest.FixtureRequest,
    ray_session: None,
    tmp_path_factory: pytest.TempPathFactory,
    free_port: Callable[[], int],
) -> Iterator[SharedStack]:
    """The shared Loom server of the serving modules; ``serving_stack.running()`` starts it on
    first use and returns its URL and store."""
    from serving_stack import SharedStack

    stack = SharedStack(tmp_path_factory.mktemp("loom-shared"), free_port)
    request.config.stash[_STACK] = stack
    try:
        yield stack
    finally:
        stack.stop()


@pytest.hookimpl(trylast=True)  # after the finished module's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the shared server once the next test does not use it: only one Loom server runs
    on the session's Ray at a time, and the training tests want its CPUs."""
    stack = item.config.stash.get(_STACK, None)
    if stack is None or not stack.is_running:
        return
    if nextitem is None or not _uses_stack(nextitem):
        stack.stop()
