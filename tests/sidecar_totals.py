"""Reading the replicas' metrics in tests the way Prometheus does: the gateway's
``/v1/admin/targets``, then each monitoring sidecar (``serving.monitoring.scrape``). A replica
rewrites its stats every second, so a count is waited for, not read once."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from serving.monitoring.scrape import scrape_sidecars, total

DEADLINE_S = 60.0


def sidecar_total(
    url: str, name: str, *, headers: Mapping[str, str] | None = None, **labels: str
) -> float:
    """``name`` summed over every replica's series whose labels include ``labels``."""
    return total(scrape_sidecars(url, headers=headers), name, **labels)


def wait_for_total(
    url: str,
    name: str,
    done: Callable[[float], bool],
    *,
    headers: Mapping[str, str] | None = None,
    deadline_s: float = DEADLINE_S,
    **labels: str,
) -> float:
    """Scrape until ``done(total)`` holds; the last total either way (the caller asserts)."""
    end = time.monotonic() + deadline_s
    while True:
        value = sidecar_total(url, name, headers=headers, **labels)
        if done(value) or time.monotonic() > end:
            return value
        time.sleep(0.25)
