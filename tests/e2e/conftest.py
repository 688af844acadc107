"""The e2e tier: ``loom serve`` as a real subprocess, spoken to over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from loom_process import LoomProcess, start_loom, stop_loom


@pytest.fixture(scope="session")
def loom_server(
    tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]
) -> Iterator[LoomProcess]:
    """The embedded default (no config file), API keys off."""
    loom = start_loom(tmp_path_factory.mktemp("e2e-open"), free_port())
    try:
        yield loom
    finally:
        stop_loom(loom)
