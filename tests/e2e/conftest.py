"""The e2e tier: ``loom serve`` as a real subprocess, spoken to over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from loom_process import LoomProcess, start_loom, stop_loom


@pytest.fixture(scope="session")
def loom_server(
    tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]
) -> Iterator[LoomProcess]:
    """The embedded default (no config file), API keys off. Its teardown is the check that
    Ctrl-C stops the server and Ray with it: exit 0, no process of its group left."""
    loom = start_loom(tmp_path_factory.mktemp("e2e-open"), free_port())
    try:
        yield loom
    finally:
        code, leftovers = stop_loom(loom)
        assert code == 0, loom.log_tail()
        assert "shutting down" in loom.log_tail()
        assert not leftovers, "processes of the server's group outlived it"
