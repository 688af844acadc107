"""The load generator's own ceiling, measured once at the start of a ``loom bench`` run
against the no-op server, and the rule that keeps a figure near it out of the report.

A server figure within 20 % of what the client can drive at all measures the client, not
the server: ``refuse_near_ceiling`` takes every such request-rate figure out of its section
and says so in the section's notes.

    ceiling = measure_ceiling()                 # {"requests_per_s": 14800.0, ...}
    refuse_near_ceiling(sections, ceiling["requests_per_s"])
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.result import Section

CEILING_SHARE = 0.8
"""A figure at or above this share of the ceiling is refused."""
RATE_UNITS = frozenset({"req/s"})
"""Units of the figures the load generator drives (request rates over HTTP)."""


def measure_ceiling(
    *, concurrency: int = 64, warmup_s: float = 1.0, duration_s: float = 3.0
) -> dict[str, Any]:
    """The closed-loop load generator at ``concurrency`` against the no-op server: its
    ``requests_per_s`` and p50, or ``error`` where the no-op server did not start. The
    server's logs go to a temporary folder, removed after."""
    from benchmarks.corpus import request_bodies, take_cycled
    from benchmarks.loadgen import LoadConfig, run_load
    from benchmarks.processes import ServerNotReady, ServerProcess
    from benchmarks.report import latency_ms
    from benchmarks.setups import EMBEDDINGS_PATH, noop_spec

    try:
        with (
            tempfile.TemporaryDirectory(prefix="loom-bench-ceiling-") as work_dir,
            ServerProcess(noop_spec(work_dir=Path(work_dir))) as server,
        ):
            load = LoadConfig(
                port=server.spec.port,
                path=EMBEDDINGS_PATH,
                concurrency=concurrency,
                warmup_s=warmup_s,
                duration_s=duration_s,
            )
            result = run_load(load, request_bodies(take_cycled(64), model="minilm"))
    except (ServerNotReady, RuntimeError, OSError) as exc:
        return {"error": f"the no-op server did not serve: {exc}"}
    return {
        "client": "benchmarks.loadgen: asyncio streams, HTTP/1.1 keep-alive, closed loop",
        "concurrency": concurrency,
        "duration_s": result.duration_s,
        "requests_per_s": result.requests / result.duration_s,
        "errors": result.errors,
        "p50_ms": latency_ms(result.latencies_ns).p50_ms,
    }


def refuse_near_ceiling(
    sections: Sequence[Section], ceiling_rps: float, share: float = CEILING_SHARE
) -> list[str]:
    """Take out of ``sections`` every request-rate figure at or above ``share`` of the
    ceiling, with a note in its section; the names taken out."""
    refused: list[str] = []
    limit = share * ceiling_rps
    for section in sections:
        kept = []
        for figure in section.figures:
            if figure.unit in RATE_UNITS and figure.value >= limit:
                refused.append(figure.name)
                section.notes.append(
                    f"{figure.name} ({figure.value:.0f} {figure.unit}) is not reported: it is "
                    f"within {1 - share:.0%} of the load generator's own ceiling "
                    f"({ceiling_rps:.0f} req/s against the no-op server), so it measures the "
                    "client, not the server"
                )
            else:
                kept.append(figure)
        section.figures = kept
    return refused
