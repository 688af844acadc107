"""The benchmark's arithmetic: percentiles, level summaries, hop costs, targets."""

from __future__ import annotations

import pytest

from benchmarks.report import (
    BatchSummary,
    LevelSummary,
    TargetGoals,
    best_batch,
    evaluate_targets,
    hop_cost,
    latency_ms,
    percentile,
    summarise_batches,
    summarise_level,
)


def _level(concurrency: int, texts_per_s: float, p50_ms: float | None = 10.0) -> LevelSummary:
    return LevelSummary(
        concurrency=concurrency,
        duration_s=10.0,
        requests=int(texts_per_s * 10),
        errors=0,
        req_per_s=texts_per_s,
        texts_per_s=texts_per_s,
        p50_ms=p50_ms,
        p95_ms=p50_ms,
        p99_ms=p50_ms,
        loadgen_cpu_share=0.01,
    )


def _batch(batch_size: int, texts_per_s: float, p50_ms: float = 5.0) -> BatchSummary:
    return BatchSummary(
        batch_size=batch_size,
        batches=100,
        duration_s=5.0,
        texts_per_s=texts_per_s,
        p50_ms=p50_ms,
        p95_ms=p50_ms,
        p99_ms=p50_ms,
    )


ENGINE = [_batch(1, 100.0, p50_ms=8.0), _batch(32, 300.0, p50_ms=100.0), _batch(64, 290.0)]


def test_percentile_interpolates_between_neighbours_like_numpy_linear() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    # rank = q/100 * (n-1): 50 -> 1.5 -> halfway between 20 and 30
    assert percentile(values, 50) == 25.0
    # 95 -> 2.85 -> 30 + 0.85 * 10
    assert percentile(values, 95) == pytest.approx(38.5)
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [-1.0, 100.5])
def test_percentile_refuses_q_outside_0_to_100(q: float) -> None:
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0, 2.0], q)


def test_percentile_refuses_an_empty_sequence() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_latency_ms_sorts_nanoseconds_and_converts_to_ms() -> None:
    # 1..100 ms in reverse order; p50 rank 49.5 -> 50.5 ms, p99 rank 98.01 -> 99.01 ms
    lat = latency_ms([ms * 1_000_000 for ms in range(100, 0, -1)])
    assert lat.p50_ms == pytest.approx(50.5)
    assert lat.p99_ms == pytest.approx(99.01)


def test_latency_ms_of_nothing_is_none() -> None:
    lat = latency_ms([])
    assert (lat.p50_ms, lat.p95_ms, lat.p99_ms) == (None, None, None)


def test_summarise_level_divides_counts_by_the_window() -> None:
    summary = summarise_level(
        concurrency=8,
        duration_s=15.0,
        requests=3000,
        errors=3,
        latencies_ns=[40_000_000] * 3000,
        texts_per_request=2,
        loadgen_cpu_s=1.5,
    )
    assert summary.req_per_s == 200.0  # 3000 / 15 s
    assert summary.texts_per_s == 400.0  # 2 texts per request
    assert summary.p50_ms == 40.0
    assert summary.loadgen_cpu_share == 0.1  # 1.5 CPU s / 15 s


def test_summarise_batches_counts_texts_as_batches_times_size() -> None:
    summary = summarise_batches(batch_size=32, duration_s=5.0, latencies_ns=[100_000_000] * 50)
    assert summary.texts_per_s == 320.0  # 50 * 32 / 5 s
    assert summary.batches == 50


def test_best_batch_is_the_highest_texts_per_s_and_the_smaller_size_on_a_tie() -> None:
    assert best_batch(ENGINE).batch_size == 32
    assert best_batch([_batch(64, 300.0), _batch(32, 300.0)]).batch_size == 32
    assert best_batch([]) is None


def test_hop_cost_is_share_of_engine_best_and_p50_over_batch_of_one() -> None:
    cost = hop_cost(ENGINE, [_level(1, 50.0, p50_ms=10.4), _level(64, 69.0)], 64, 1)
    assert cost.share_of_engine == pytest.approx(0.23)  # 69 / 300
    assert cost.added_p50_ms == pytest.approx(2.4)  # 10.4 - 8.0


def test_targets_pass_when_the_stack_reaches_every_goal() -> None:
    stack = [_level(1, 100.0, p50_ms=12.0), _level(64, 250.0)]
    plain = [_level(64, 100.0)]
    targets = {t.name: t for t in evaluate_targets(engine=ENGINE, stack=stack, plain=plain)}
    assert targets["stack_over_engine"].value == pytest.approx(250 / 300)  # 0.83 >= 0.8
    assert targets["stack_over_plain"].value == pytest.approx(2.5)  # 250 / 100 >= 2
    assert targets["stack_added_p50_ms"].value == pytest.approx(4.0)  # 12 - 8 <= 5
    assert [t.verdict for t in targets.values()] == ["PASS", "PASS", "PASS"]


def test_targets_miss_below_the_goal_and_above_the_latency_limit() -> None:
    stack = [_level(1, 100.0, p50_ms=20.0), _level(64, 180.0)]
    plain = [_level(64, 100.0)]
    targets = {t.name: t for t in evaluate_targets(engine=ENGINE, stack=stack, plain=plain)}
    assert targets["stack_over_engine"].passed is False  # 180 / 300 = 0.6 < 0.8
    assert targets["stack_over_plain"].passed is False  # 1.8 < 2
    assert targets["stack_added_p50_ms"].passed is False  # 20 - 8 = 12 > 5


def test_a_target_exactly_at_its_goal_passes() -> None:
    stack = [_level(1, 100.0, p50_ms=13.0), _level(64, 240.0)]  # 240 / 300 = 0.8, +5.0 ms
    plain = [_level(64, 120.0)]  # 240 / 120 = 2.0
    assert all(t.passed for t in evaluate_targets(engine=ENGINE, stack=stack, plain=plain))


def test_targets_are_not_applicable_where_a_level_was_not_measured() -> None:
    targets = evaluate_targets(engine=ENGINE, stack=[_level(8, 200.0)], plain=[])
    assert [t.verdict for t in targets] == ["N/A", "N/A", "N/A"]
    assert all(t.value is None for t in targets)


def test_targets_follow_the_concurrencies_named_in_the_goals() -> None:
    goals = TargetGoals(high_concurrency=32, low_concurrency=8)
    stack = [_level(8, 100.0, p50_ms=10.0), _level(32, 270.0)]
    targets = evaluate_targets(engine=ENGINE, stack=stack, plain=[_level(32, 90.0)], goals=goals)
    assert [t.value for t in targets] == pytest.approx([0.9, 3.0, 2.0])  # 270/300, 270/90, 10-8
