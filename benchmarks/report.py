"""Pure arithmetic of a benchmark run: percentiles, per-level summaries, targets, one-line text.

Nothing here measures, starts or reads anything; the one edge is ``write_json``. Every
summary is a frozen dataclass so the JSON is ``dataclasses.asdict`` of what was printed.

    summary = summarise_level(concurrency=8, duration_s=15.0, requests=3000, errors=0,
                              latencies_ns=lat, texts_per_request=1, loadgen_cpu_s=0.6)
    print(format_level_line("stack", summary))
    targets = evaluate_targets(engine=sweep_summary, stack=levels, plain=plain_levels)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.result import ratio

NS_PER_MS = 1_000_000


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending ``sorted_values``, linearly interpolated.

    Same definition as ``numpy.percentile(..., method="linear")``: rank ``q/100 * (n-1)``,
    interpolated between its two neighbours. ``percentile([10, 20, 30, 40], 50) == 25.0``.
    Raises ``ValueError`` on an empty sequence or ``q`` outside [0, 100].
    """
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    rank = q / 100.0 * (len(sorted_values) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


@dataclass(frozen=True, kw_only=True)
class LatencyMs:
    """Latency percentiles in milliseconds; all ``None`` when nothing was measured."""

    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def latency_ms(latencies_ns: Sequence[int]) -> LatencyMs:
    """p50/p95/p99 in ms of durations given in ns (any order); ``None`` each if empty."""
    if not latencies_ns:
        return LatencyMs(p50_ms=None, p95_ms=None, p99_ms=None)
    ordered = sorted(latencies_ns)
    return LatencyMs(
        p50_ms=percentile(ordered, 50) / NS_PER_MS,
        p95_ms=percentile(ordered, 95) / NS_PER_MS,
        p99_ms=percentile(ordered, 99) / NS_PER_MS,
    )


@dataclass(frozen=True, kw_only=True)
class LevelSummary:
    """One closed-loop load level against one HTTP setup."""

    concurrency: int
    """Virtual users, each with one keep-alive connection and one request in flight."""
    duration_s: float
    """Length of the measured window (warm-up excluded)."""
    requests: int
    """Successful (HTTP 200) requests sent and answered inside the window."""
    errors: int
    """Failed requests in the window: non-200 answers, resets, malformed responses."""
    req_per_s: float
    texts_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    loadgen_cpu_share: float
    """CPU seconds the load generator's process used per second of window (1.0 = one core)."""
    batch_sizes: BatchSizes | None = None
    """The stack's engine runs by batch size in the window; None for the other set-ups or
    where the stack's metrics could not be read."""


@dataclass(frozen=True, kw_only=True)
class HistogramReading:
    """One scrape of a Prometheus histogram, summed over replicas: cumulative counts by upper
    bound (``math.inf`` for ``+Inf``) and the sum of the observed values."""

    cumulative: Mapping[float, float]
    sum: float


@dataclass(frozen=True, kw_only=True)
class BatchSizes:
    """Engine runs by batch size during one level's window: the stack's ``loom_batch_size``
    histogram after the window minus before it. ``counts[i]`` runs held more than ``le[i-1]``
    and at most ``le[i]`` inputs; one count more than bounds, the last for above ``le[-1]``
    (the stats file's layout, ``serving.monitoring.stats``)."""

    le: tuple[float, ...]
    counts: tuple[int, ...]
    inputs: float
    """Inputs in those runs (the histogram's sum): ``inputs / sum(counts)`` is the mean batch."""


def batch_sizes_between(before: HistogramReading, after: HistogramReading) -> BatchSizes:
    """The runs observed between two readings, per bucket (not cumulative).

    Cumulative before {1: 2, 2: 3, inf: 3}, after {1: 5, 2: 9, inf: 10} -> in the window
    (3, 6, 7) -> counts (3, 3, 1) over le (1, 2). A bound missing before counts as 0 (no run
    yet). ``ValueError`` where ``after`` has no buckets or a count went down (a replica
    restarted and its counts began again).
    """
    bounds = sorted(after.cumulative)
    if not bounds or bounds[-1] != math.inf:
        raise ValueError("no +Inf bucket in the histogram after the window")
    in_window = [after.cumulative[le] - before.cumulative.get(le, 0.0) for le in bounds]
    counts = [high - low for low, high in zip([0.0, *in_window[:-1]], in_window, strict=True)]
    if any(count < 0 for count in (*in_window, *counts)):
        raise ValueError("a bucket count went down during the window (a replica restarted?)")
    return BatchSizes(
        le=tuple(bounds[:-1]),
        counts=tuple(round(count) for count in counts),
        inputs=after.sum - before.sum,
    )


def summarise_level(
    *,
    concurrency: int,
    duration_s: float,
    requests: int,
    errors: int,
    latencies_ns: Sequence[int],
    texts_per_request: int,
    loadgen_cpu_s: float,
    batch_sizes: BatchSizes | None = None,
) -> LevelSummary:
    """Rates and percentiles of one level; ``latencies_ns`` holds the successful requests'.

    3000 requests of 1 text in a 15 s window -> 200 req/s and 200 texts/s.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    lat = latency_ms(latencies_ns)
    return LevelSummary(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=requests,
        errors=errors,
        req_per_s=requests / duration_s,
        texts_per_s=requests * texts_per_request / duration_s,
        p50_ms=lat.p50_ms,
        p95_ms=lat.p95_ms,
        p99_ms=lat.p99_ms,
        loadgen_cpu_share=loadgen_cpu_s / duration_s,
        batch_sizes=batch_sizes,
    )


@dataclass(frozen=True, kw_only=True)
class BatchSummary:
    """The engine in-process at one batch size."""

    batch_size: int
    batches: int
    """Batches run in the measured window."""
    duration_s: float
    texts_per_s: float
    p50_ms: float | None
    """Batch latency percentiles: one ``engine.run`` call, start to vectors in hand."""
    p95_ms: float | None
    p99_ms: float | None


def summarise_batches(
    *, batch_size: int, duration_s: float, latencies_ns: Sequence[int]
) -> BatchSummary:
    """Texts/s and batch-latency percentiles; 50 batches of 32 in 5 s -> 320 texts/s."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    lat = latency_ms(latencies_ns)
    return BatchSummary(
        batch_size=batch_size,
        batches=len(latencies_ns),
        duration_s=duration_s,
        texts_per_s=len(latencies_ns) * batch_size / duration_s,
        p50_ms=lat.p50_ms,
        p95_ms=lat.p95_ms,
        p99_ms=lat.p99_ms,
    )


def level_from_json(record: Mapping[str, Any]) -> LevelSummary:
    """A level back from the benchmark's JSON (``loom bench`` reads a finished run)."""
    known = {f.name for f in dataclasses.fields(LevelSummary)} - {"batch_sizes"}
    sizes = record.get("batch_sizes")
    return LevelSummary(
        **{k: v for k, v in record.items() if k in known},
        batch_sizes=None
        if sizes is None
        else BatchSizes(
            le=tuple(sizes["le"]), counts=tuple(sizes["counts"]), inputs=sizes["inputs"]
        ),
    )


def batch_from_json(record: Mapping[str, Any]) -> BatchSummary:
    """An engine batch size back from the benchmark's JSON."""
    known = {f.name for f in dataclasses.fields(BatchSummary)}
    return BatchSummary(**{k: v for k, v in record.items() if k in known})


def best_batch(sweep: Sequence[BatchSummary]) -> BatchSummary | None:
    """The batch size with the highest texts/s (the smaller size on a tie); ``None`` if empty."""
    if not sweep:
        return None
    return max(sweep, key=lambda s: (s.texts_per_s, -s.batch_size))


def level_at(levels: Sequence[LevelSummary], concurrency: int) -> LevelSummary | None:
    """The level measured at exactly ``concurrency``, or ``None``."""
    return next((level for level in levels if level.concurrency == concurrency), None)


@dataclass(frozen=True, kw_only=True)
class TargetGoals:
    """What the whole stack should reach against the engine alone and the plain server."""

    min_stack_over_engine: float = 0.8
    """Stack texts/s at ``high_concurrency`` / the engine's best texts/s in-process."""
    min_stack_over_plain: float = 2.0
    """Stack texts/s / plain FastAPI server texts/s, both at ``high_concurrency``."""
    max_stack_added_p50_ms: float = 5.0
    """Stack p50 at ``low_concurrency`` minus the engine's batch-of-1 p50."""
    min_stack_over_rayserve: float = 1.3
    """Stack req/s / Ray Serve alone req/s at the highest concurrency both ran (``loom bench``
    reports it; the module's own PASS/MISS lines are the three above)."""
    high_concurrency: int = 64
    low_concurrency: int = 1


@dataclass(frozen=True, kw_only=True)
class Target:
    """One figure against its goal; ``value is None`` when an input was not measured."""

    name: str
    value: float | None
    goal: float
    higher_is_better: bool
    formula: str

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "N/A"}[self.passed]


def _difference(minuend: float | None, subtrahend: float | None) -> float | None:
    if minuend is None or subtrahend is None:
        return None
    return minuend - subtrahend


def evaluate_targets(
    *,
    engine: Sequence[BatchSummary],
    stack: Sequence[LevelSummary],
    plain: Sequence[LevelSummary],
    goals: TargetGoals | None = None,
) -> list[Target]:
    """The three targets of the embeddings benchmark, each ``N/A`` where an input is missing.

    Engine best 300 texts/s, stack 250 at c=64, plain 100 at c=64 -> 0.83 (PASS), 2.5 (PASS).
    """
    goals = goals or TargetGoals()
    hi, lo = goals.high_concurrency, goals.low_concurrency
    stack_cost = hop_cost(engine, stack, hi, lo)
    stack_hi, plain_hi = level_at(stack, hi), level_at(plain, hi)
    return [
        Target(
            name="stack_over_engine",
            value=stack_cost.share_of_engine,
            goal=goals.min_stack_over_engine,
            higher_is_better=True,
            formula=f"stack texts/s at c={hi} / engine best texts/s",
        ),
        Target(
            name="stack_over_plain",
            value=ratio(
                stack_hi.texts_per_s if stack_hi else None,
                plain_hi.texts_per_s if plain_hi else None,
            ),
            goal=goals.min_stack_over_plain,
            higher_is_better=True,
            formula=f"stack texts/s at c={hi} / plain texts/s at c={hi}",
        ),
        Target(
            name="stack_added_p50_ms",
            value=stack_cost.added_p50_ms,
            goal=goals.max_stack_added_p50_ms,
            higher_is_better=False,
            formula=f"stack p50 at c={lo} - engine batch-1 p50 (ms)",
        ),
    ]


@dataclass(frozen=True, kw_only=True)
class HopCost:
    """What serving over HTTP costs against the engine alone (ARCHITECTURE "What hops cost")."""

    share_of_engine: float | None
    """Texts/s at ``high_concurrency`` / the engine's best texts/s in-process."""
    added_p50_ms: float | None
    """p50 at ``low_concurrency`` minus the engine's batch-of-1 p50."""
    high_concurrency: int
    low_concurrency: int


def hop_cost(
    engine: Sequence[BatchSummary],
    levels: Sequence[LevelSummary],
    high_concurrency: int,
    low_concurrency: int,
) -> HopCost:
    """Share of the engine's best throughput and added p50 of one HTTP setup.

    Plain at 70 texts/s at c=64 with the engine's best at 300 -> share 0.23.
    """
    best = best_batch(engine)
    batch_of_one = next((s for s in engine if s.batch_size == 1), None)
    high, low = level_at(levels, high_concurrency), level_at(levels, low_concurrency)
    return HopCost(
        share_of_engine=ratio(
            high.texts_per_s if high else None, best.texts_per_s if best else None
        ),
        added_p50_ms=_difference(
            low.p50_ms if low else None, batch_of_one.p50_ms if batch_of_one else None
        ),
        high_concurrency=high_concurrency,
        low_concurrency=low_concurrency,
    )


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_level_line(setup: str, level: LevelSummary) -> str:
    """One line with units, e.g. ``stack c=64: 250.1 req/s, 250.1 texts/s, p50 250.3 ms ...``."""
    return (
        f"{setup:<6} c={level.concurrency:<3}: {level.req_per_s:8.1f} req/s "
        f"{level.texts_per_s:8.1f} texts/s  p50 {_fmt(level.p50_ms, '7.2f')} ms  "
        f"p95 {_fmt(level.p95_ms, '7.2f')} ms  p99 {_fmt(level.p99_ms, '7.2f')} ms  "
        f"{level.requests} ok {level.errors} errors  "
        f"loadgen {level.loadgen_cpu_share * 100:.0f}% of a core"
    )


def format_batch_line(batch: BatchSummary) -> str:
    """One line with units for one engine batch size."""
    return (
        f"engine b={batch.batch_size:<4}: {batch.texts_per_s:8.1f} texts/s  "
        f"batch p50 {_fmt(batch.p50_ms, '7.2f')} ms  p95 {_fmt(batch.p95_ms, '7.2f')} ms  "
        f"p99 {_fmt(batch.p99_ms, '7.2f')} ms  ({batch.batches} batches)"
    )


def format_batch_sizes_line(setup: str, concurrency: int, sizes: BatchSizes) -> str:
    """``stack  c=64 : 120 engine runs in the window, mean batch 10.4 texts``."""
    runs = sum(sizes.counts)
    mean = _fmt(sizes.inputs / runs if runs else None, ".1f")
    return (
        f"{setup:<6} c={concurrency:<3}: {runs} engine runs in the window, mean batch {mean} texts"
    )


def format_hop_cost_line(setup: str, cost: HopCost) -> str:
    """``plain : 0.23 of engine texts/s at c=64, +2.4 ms p50 at c=1``."""
    return (
        f"{setup:<6}: {_fmt(cost.share_of_engine, '.2f')} of engine texts/s at "
        f"c={cost.high_concurrency}, {_fmt(cost.added_p50_ms, '+.1f')} ms p50 at "
        f"c={cost.low_concurrency}"
    )


def format_target_line(target: Target) -> str:
    """``stack_over_engine    0.83 (goal >= 0.8)  PASS  stack texts/s at c=64 / ...``."""
    sign = ">=" if target.higher_is_better else "<="
    return (
        f"{target.name:<20} {_fmt(target.value, '8.2f')} (goal {sign} {target.goal:g})  "
        f"{target.verdict:<4}  {target.formula}"
    )


def target_record(target: Target) -> dict[str, Any]:
    """A target as a JSON object, with its verdict."""
    return {
        "name": target.name,
        "value": target.value,
        "goal": target.goal,
        "comparison": ">=" if target.higher_is_better else "<=",
        "passed": target.passed,
        "verdict": target.verdict,
        "formula": target.formula,
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (a temp file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
