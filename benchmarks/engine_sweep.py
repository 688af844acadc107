"""The embedding engine alone, in this process, at several batch sizes: the ceiling that every
HTTP setup is compared with.

Each batch size gets a few warm-up batches, then back-to-back ``engine.run`` calls for a fixed
time; a call's latency is start to vectors in hand (``run`` returns NumPy arrays on the CPU,
so a GPU run is synchronised by the copy).

    engine = EmbeddingEngine(bundled_model_dir()); engine.load(); engine.warmup()
    config = SweepConfig(duration_s_per_size=5.0)
    sweep = [measure_batch_size(engine, take_cycled(64), b, config) for b in config.batch_sizes]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from benchmarks.report import BatchSummary, summarise_batches

NS_PER_S = 1_000_000_000


class BatchRunner(Protocol):
    """What the sweep needs of an engine: run one batch of texts."""

    def run(self, texts: Sequence[str]) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """Which batch sizes to measure and for how long each."""

    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64, 128)
    duration_s_per_size: float = 5.0
    """Measured time per batch size, after its warm-up batches."""
    warmup_batches: int = 3
    max_batches_per_size: int = 1_000_000
    """Upper bound on measured batches per size, whatever the duration."""

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be >= 1 each, got {self.batch_sizes}")
        if self.duration_s_per_size <= 0 or self.warmup_batches < 0:
            raise ValueError("duration_s_per_size must be > 0 and warmup_batches >= 0")


def batch_at(texts: Sequence[str], batch_size: int, index: int) -> list[str]:
    """The ``index``-th batch of ``batch_size`` texts, walking ``texts`` cyclically.

    Consecutive batches take consecutive texts, so padding varies as it does in serving:
    with 64 texts, batch 1 of size 8 is texts 8..15 and batch 8 starts over at text 0.
    """
    start = batch_size * index
    return [texts[(start + offset) % len(texts)] for offset in range(batch_size)]


def measure_batch_size(
    engine: BatchRunner, texts: Sequence[str], batch_size: int, config: SweepConfig
) -> BatchSummary:
    """Warm up, then run batches back to back for ``duration_s_per_size``; summarise them."""
    batches = [batch_at(texts, batch_size, i) for i in range(max(1, len(texts)))]
    for i in range(config.warmup_batches):
        engine.run(batches[i % len(batches)])
    latencies_ns: list[int] = []
    window_ns = int(config.duration_s_per_size * NS_PER_S)
    started_ns = time.perf_counter_ns()
    ended_ns = started_ns
    for i in range(config.max_batches_per_size):
        batch_start_ns = time.perf_counter_ns()
        engine.run(batches[i % len(batches)])
        ended_ns = time.perf_counter_ns()
        latencies_ns.append(ended_ns - batch_start_ns)
        if ended_ns - started_ns >= window_ns:
            break
    return summarise_batches(
        batch_size=batch_size,
        duration_s=(ended_ns - started_ns) / NS_PER_S,
        latencies_ns=latencies_ns,
    )
