"""The integration tier: one local Ray for the whole session, shut down at its end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import os

    import ray

    from serving.app import ray_serve_env

    for key, value in ray_serve_env().items():  # the settings `loom serve` runs with
        os.environ.setdefault(key, value)
    ray.init(
        num_cpus=4,  # logical: room for two 1-CPU replicas beside the gateway
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
