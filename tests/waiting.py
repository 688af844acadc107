"""Waiting in tests for what the code reports, never for a time: ``wait_until`` polls a
condition and fails, naming what it waited for, only past a generous deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_until(
    condition: Callable[[], object], what: str, deadline_s: float = 180.0, poll_s: float = 0.2
) -> float:
    """Seconds until ``condition()`` held; ``pytest.fail`` naming ``what`` past the deadline."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline_s:
            pytest.fail(f"not within {deadline_s:.0f} s: {what}")
        time.sleep(poll_s)
    return time.monotonic() - started
