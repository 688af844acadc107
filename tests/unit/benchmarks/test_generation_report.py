"""Token rates, TTFT, the replayed closed loop and the targets of the generation benchmark."""

from __future__ import annotations

import pytest

from benchmarks.generation_report import (
    BatchTiming,
    GenerationGoals,
    GenerationLevel,
    LevelFigures,
    RequestTiming,
    closed_loop_offsets,
    evaluate_generation_targets,
    format_generation_line,
    highest_common_concurrency,
    replay_closed_loop,
    sequential_figures,
    static_figures,
    summarise_generation,
    tokens_in_window,
    useful_token_share,
    window_figures,
)

S = 1_000_000_000  # ns per second
MS = 1_000_000


def _request(sent_s: float, first_s: float, done_s: float, tokens: int = 64) -> RequestTiming:
    return RequestTiming(
        sent_ns=round(sent_s * S), first_token_ns=round(first_s * S), done_ns=round(done_s * S),
        tokens=tokens,
    )  # fmt: skip


def _level(concurrency: int, tokens_per_s: float, ttft_p50_ms: float | None) -> GenerationLevel:
    return GenerationLevel(
        concurrency=concurrency, tokens_per_s=tokens_per_s, ttft_p50_ms=ttft_p50_ms,
        ttft_p95_ms=ttft_p50_ms, ttft_p99_ms=ttft_p50_ms, requests=10, duration_s=10.0,
    )  # fmt: skip


def test_tokens_in_window_counts_the_overlapping_share_of_each_stream() -> None:
    # 64 tokens from 1 s to 3 s; the window [2 s, 10 s] holds half the stream
    assert tokens_in_window([_request(0.5, 1, 3)], 2 * S, 10 * S) == pytest.approx(32)


def test_tokens_in_window_counts_whole_streams_inside_and_nothing_outside() -> None:
    inside, before, after = _request(2, 3, 4), _request(0, 0.5, 1), _request(11, 12, 13)
    assert tokens_in_window([inside, before, after], 2 * S, 10 * S) == 64


def test_tokens_in_window_counts_a_single_instant_token_where_it_landed() -> None:
    assert tokens_in_window([_request(1, 3, 3, tokens=1)], 2 * S, 10 * S) == 1
    assert tokens_in_window([_request(1, 1.5, 1.5, tokens=1)], 2 * S, 10 * S) == 0


def test_tokens_in_window_refuses_an_empty_window() -> None:
    with pytest.raises(ValueError, match="window"):
        tokens_in_window([], 5 * S, 5 * S)


def test_window_figures_take_ttft_only_from_requests_sent_inside_the_window() -> None:
    warmup = _request(0.5, 1, 3)  # sent before the window: its 0.5 s TTFT is left out
    measured = _request(2, 2.1, 4)
    figures = window_figures([warmup, measured], 2 * S, 12 * S)
    assert figures.ttft_ns == (100 * MS,)  # 2.1 - 2.0 s
    assert figures.tokens == pytest.approx(32 + 64)  # half of the first, all of the second
    assert figures.duration_s == 10.0
    assert figures.requests == 1


def _back_to_back(count: int, service_s: float = 1.0, first_s: float = 0.1) -> list[RequestTiming]:
    return [
        _request(k * service_s, k * service_s + first_s, (k + 1) * service_s) for k in range(count)
    ]


def test_replay_sends_the_first_c_at_the_start_and_each_next_when_one_ends() -> None:
    replayed = replay_closed_loop(_back_to_back(5), concurrency=2)
    # requests 0 and 1 arrive at 0 s; request 2 when request 0 ends (1 s), 3 at 2 s, 4 at 3 s
    assert [t.sent_ns // S for t in replayed] == [0, 0, 1, 2, 3]
    # request 3 waits for request 2 (2 s -> 3 s), then 0.1 s to its first token: 1.1 s
    assert replayed[3].ttft_ns == 1100 * MS


def test_closed_loop_offsets_spread_clients_over_the_requests() -> None:
    assert closed_loop_offsets(64, 8) == [0, 8, 16, 24, 32, 40, 48, 56]  # 64 / 8 apart
    assert closed_loop_offsets(4, 3) == [0, 1, 2]  # 4 // 3 = 1 apart
    assert closed_loop_offsets(4, 6) == [0, 1, 2, 3, 4, 5]  # at least 1 apart; 4, 5 wrap
    with pytest.raises(ValueError, match="client"):
        closed_loop_offsets(4, 0)


def test_replay_refuses_concurrency_below_one() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        replay_closed_loop(_back_to_back(3), concurrency=0)


def test_sequential_ttft_in_steady_state_is_c_minus_1_services_plus_its_own() -> None:
    figures = sequential_figures(_back_to_back(12), concurrency=4)
    # each measured request waits 3 services of 1 s, then 0.1 s: 3.1 s, for the 8 after the first 4
    assert figures.ttft_ns == (3100 * MS,) * 8
    # the rate is the whole run's: 12 x 64 tokens in 12 s, whatever c is
    assert figures.tokens / figures.duration_s == pytest.approx(64.0)


def test_sequential_figures_at_c1_are_the_requests_own_time_to_first_token() -> None:
    figures = sequential_figures(_back_to_back(3), concurrency=1)
    assert figures.ttft_ns == (100 * MS, 100 * MS)


def test_sequential_figures_need_more_requests_than_clients() -> None:
    with pytest.raises(ValueError, match="more than 4"):
        sequential_figures(_back_to_back(4), concurrency=4)


def test_static_figures_give_every_request_its_batch_ttft() -> None:
    batches = [
        BatchTiming(started_ns=0, first_token_ns=200 * MS, done_ns=2 * S, size=8, tokens=512,
                    computed_tokens=768),
        BatchTiming(started_ns=2 * S, first_token_ns=2 * S + 300 * MS, done_ns=4 * S, size=8,
                    tokens=512, computed_tokens=640),
    ]  # fmt: skip
    figures = static_figures(batches)
    assert figures.ttft_ns == (200 * MS,) * 8 + (300 * MS,) * 8
    # useful tokens only: 1024 in 4 s, not the 1408 computed
    assert figures.tokens / figures.duration_s == 256.0


def test_useful_token_share_is_own_lengths_over_rows_run_to_the_longest() -> None:
    # lengths 40 and 88 in one batch: 88 steps x 2 rows computed, 128 useful
    batch = BatchTiming(started_ns=0, first_token_ns=1, done_ns=2, size=2, tokens=128,
                        computed_tokens=176)  # fmt: skip
    assert useful_token_share([batch]) == pytest.approx(128 / 176)  # 0.73
    with pytest.raises(ValueError, match="no tokens"):
        useful_token_share([])


def test_static_figures_refuse_no_batches() -> None:
    with pytest.raises(ValueError, match="no batches"):
        static_figures([])


def test_summarise_generation_divides_tokens_by_the_window_and_takes_percentiles() -> None:
    figures = LevelFigures(
        ttft_ns=tuple(ms * MS for ms in range(1, 101)), tokens=6400.0, duration_s=10.0,
        requests=100,
    )  # fmt: skip
    level = summarise_generation(concurrency=8, figures=figures, loadgen_cpu_s=0.5)
    assert level.tokens_per_s == 640.0  # 6400 / 10 s
    assert level.ttft_p50_ms == pytest.approx(50.5)  # rank 49.5 of 1..100 ms
    assert level.ttft_p95_ms == pytest.approx(95.05)  # rank 94.05
    assert level.loadgen_cpu_share == 0.05  # 0.5 CPU s / 10 s


def test_summarise_generation_of_nothing_measured_has_no_percentiles() -> None:
    level = summarise_generation(
        concurrency=1, figures=LevelFigures(ttft_ns=(), tokens=0.0, duration_s=5.0, requests=0)
    )
    assert (level.tokens_per_s, level.ttft_p50_ms, level.loadgen_cpu_share) == (0.0, None, None)


def test_targets_pass_when_stack_is_4x_sequential_and_ttft_at_most_doubles() -> None:
    levels = {
        "stack": [_level(1, 150.0, 25.0), _level(8, 600.0, 45.0), _level(32, 900.0, 80.0)],
        "sequential": [_level(1, 200.0, 12.0), _level(32, 200.0, 9000.0)],
        "cb": [_level(1, 160.0, 20.0), _level(32, 1000.0, 70.0)],
    }
    targets = {t.name: t for t in evaluate_generation_targets(levels)}
    assert targets["stack_over_sequential"].value == pytest.approx(4.5)  # 900 / 200 >= 4
    assert targets["stack_ttft_growth"].value == pytest.approx(1.8)  # 45 / 25 <= 2
    assert targets["stack_share_of_cb"].value == pytest.approx(0.9)  # 900 / 1000 >= 0.8
    assert [t.verdict for t in targets.values()] == ["PASS", "PASS", "PASS"]


def test_targets_miss_below_4x_and_above_double_ttft() -> None:
    levels = {
        "stack": [_level(1, 150.0, 25.0), _level(8, 600.0, 60.0), _level(32, 700.0, 80.0)],
        "sequential": [_level(32, 200.0, 9000.0)],
        "cb": [_level(32, 1000.0, 70.0)],
    }
    targets = {t.name: t for t in evaluate_generation_targets(levels)}
    assert targets["stack_over_sequential"].passed is False  # 700 / 200 = 3.5 < 4
    assert targets["stack_ttft_growth"].passed is False  # 60 / 25 = 2.4 > 2
    assert targets["stack_share_of_cb"].passed is False  # 700 / 1000 = 0.7 < 0.8


def test_targets_exactly_at_their_goals_pass() -> None:
    levels = {
        "stack": [_level(1, 100.0, 20.0), _level(8, 500.0, 40.0), _level(32, 800.0, 90.0)],
        "sequential": [_level(32, 200.0, 9000.0)],
        "cb": [_level(32, 1000.0, 70.0)],
    }
    assert all(t.passed for t in evaluate_generation_targets(levels))  # 4.0, 2.0 and 0.8


def test_targets_are_not_applicable_without_the_stack() -> None:
    targets = evaluate_generation_targets(
        {"sequential": [_level(32, 200.0, 9000.0)], "cb": [_level(32, 1000.0, 70.0)]}
    )
    assert [t.verdict for t in targets] == ["N/A", "N/A", "N/A"]


def test_stack_share_of_cb_is_not_applicable_without_cb_or_a_common_level() -> None:
    stack = [_level(8, 600.0, 45.0), _level(32, 900.0, 80.0)]
    for levels in ({"stack": stack}, {"stack": stack, "cb": [_level(16, 800.0, 50.0)]}):
        targets = {t.name: t for t in evaluate_generation_targets(levels)}
        assert targets["stack_share_of_cb"].verdict == "N/A"
        assert "at c=?" in targets["stack_share_of_cb"].formula


def test_stack_share_of_cb_is_taken_at_the_highest_level_both_ran() -> None:
    levels = {
        "stack": [_level(1, 150.0, 25.0), _level(8, 600.0, 45.0), _level(32, 900.0, 80.0)],
        "cb": [_level(1, 200.0, 20.0), _level(8, 500.0, 40.0)],  # no c=32
    }
    (share,) = [t for t in evaluate_generation_targets(levels) if t.name == "stack_share_of_cb"]
    assert share.value == pytest.approx(1.2)  # c=8: 600 / 500
    assert "at c=8" in share.formula


def test_highest_common_concurrency_is_the_top_level_in_both() -> None:
    assert highest_common_concurrency([_level(1, 1, 1), _level(8, 1, 1), _level(32, 1, 1)],
                                      [_level(1, 1, 1), _level(8, 1, 1)]) == 8  # fmt: skip
    assert highest_common_concurrency([_level(4, 1, 1)], [_level(8, 1, 1)]) is None
    assert highest_common_concurrency([], []) is None


def test_targets_follow_the_concurrencies_named_in_the_goals() -> None:
    goals = GenerationGoals(high_concurrency=8, busy_concurrency=4, idle_concurrency=2)
    levels = {
        "stack": [_level(2, 100.0, 10.0), _level(4, 300.0, 15.0), _level(8, 500.0, 30.0)],
        "sequential": [_level(8, 100.0, 500.0)],
    }
    targets = evaluate_generation_targets(levels, goals)
    assert [t.value for t in targets[:2]] == pytest.approx([5.0, 1.5])  # 500 / 100, 15 / 10


def test_format_generation_line_has_units_and_counts() -> None:
    line = format_generation_line("stack", _level(8, 812.4, 31.2))
    assert "c=8" in line
    assert "812.4 tokens/s" in line
    assert "TTFT p50    31.20 ms" in line
    assert "10 requests, 0 errors, 0 short" in line
