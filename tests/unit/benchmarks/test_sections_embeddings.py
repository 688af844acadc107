"""``benchmarks.sections.embeddings`` on a recorded run (``recorded/embeddings.json``: a
2-core CPU run at c=1 and c=64, engine batches 1 and 32, trimmed; the stack's
``batch_sizes`` come from a second run with the same options, the first predating them), and
the stack's batch-size histogram read from sidecar text and diffed."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from benchmarks.embeddings import batch_size_reading, open_loop_rates, parse_shares
from benchmarks.plots import draw_charts
from benchmarks.report import BatchSizes, HistogramReading, batch_sizes_between, level_from_json
from benchmarks.sections import extract
from benchmarks.sections.embeddings import section
from serving.monitoring.adapters import Families, export_replica
from serving.monitoring.stats import BATCH_SIZE_BUCKETS, Histogram

RECORDED = json.loads((Path(__file__).parent / "recorded" / "embeddings.json").read_text())


def _raw() -> dict[str, Any]:
    return copy.deepcopy(RECORDED)


def _figures(raw: dict[str, Any]) -> dict[str, float]:
    return {f.name.removeprefix("embeddings."): f.value for f in section(raw).figures}


# ---- figures ----------------------------------------------------------------------------------


def test_the_recorded_run_gives_ratios_against_each_baseline_at_c64() -> None:
    result = extract("embeddings", _raw())
    figures = {f.name: f for f in result.figures}
    # stack 1249 answers in 3 s = 416.3 req/s; Ray Serve 1844 / 3 = 614.7 -> 0.68
    rayserve = figures["embeddings.stack_vs_rayserve_c64"]
    assert rayserve.value == pytest.approx(416.33 / 614.67, rel=1e-3)
    assert (rayserve.unit, rayserve.goal, rayserve.met) == ("x", ">= 1.3", False)
    # the engine at batch 32 ran 770.95 texts/s: 416.33 / 770.95 = 0.54
    engine = figures["embeddings.stack_vs_engine_b32_c64"]
    assert engine.value == pytest.approx(416.33 / 770.95, rel=1e-3)
    assert (engine.goal, engine.met) == (">= 0.8", False)
    # plain 493 / 3 = 164.3 req/s: 416.33 / 164.33 = 2.53
    assert figures["embeddings.stack_vs_plain_c64"].value == pytest.approx(2.533, rel=1e-3)
    assert figures["embeddings.stack_vs_plain_c64"].met is True
    assert figures["embeddings.stack_rps_c64"].unit == "req/s"
    assert figures["embeddings.engine_best_texts_per_s"].unit == "texts/s"


def test_added_p50_is_each_setups_c1_p50_minus_the_engines_batch_of_one() -> None:
    figures = {f.name.removeprefix("embeddings."): f for f in section(_raw()).figures}
    stack = figures["stack_added_p50_ms_c1"]
    # 16.623 ms at c=1 - 5.020 ms for one batch of 1 = 11.603 ms, over the 5 ms goal
    assert stack.value == pytest.approx(16.623276 - 5.020273)
    assert (stack.unit, stack.better, stack.goal, stack.met) == ("ms", "lower", "<= 5", False)
    assert figures["rayserve_added_p50_ms_c1"].value == pytest.approx(24.086487 - 5.020273)
    assert figures["plain_added_p50_ms_c1"].value == pytest.approx(7.735167 - 5.020273)
    assert figures["plain_added_p50_ms_c1"].goal is None


def test_the_modules_targets_equal_to_a_figure_are_not_added_twice() -> None:
    result = section(_raw())
    names = {f.name for f in result.figures}
    # stack_over_engine == stack_vs_engine_b32_c64 here (the best batch is 32), and so on
    assert not names & {"embeddings.stack_over_engine", "embeddings.stack_over_plain"}
    targets = next(t for t in result.tables if t.title.startswith("The module's own targets"))
    assert [row[3] for row in targets.rows] == ["MISS", "PASS", "MISS"]


def test_without_batch_32_the_stack_is_held_against_the_engines_best() -> None:
    raw = _raw()
    raw["engine"]["sweep"][1]["batch_size"] = 16
    result = section(raw)
    names = {f.name for f in result.figures}
    assert "embeddings.stack_vs_engine_b16_c64" in names
    assert any("did not run batch 32" in note for note in result.notes)
    # the module's stack_over_engine (against the best, batch 16) now equals that figure too
    assert "embeddings.stack_over_engine" not in names


# ---- the load generator's ceiling and missing set-ups -----------------------------------------


def test_a_level_within_20_percent_of_the_loadgen_ceiling_gives_no_figure() -> None:
    raw = _raw()
    raw["loadgen"]["levels"][0]["req_per_s"] = 500.0  # refuse from 0.8 * 500 = 400 req/s
    result = section(raw)
    figures = {f.name.removeprefix("embeddings."): f.value for f in result.figures}
    # stack 416 and Ray Serve 615 at c=64 are refused; at c=1 both stay: 59.67 / 41.0 = 1.46
    assert not [name for name in figures if name.endswith("_c64")]
    assert figures["stack_vs_rayserve_c1"] == pytest.approx(59.667 / 41.0, rel=1e-3)
    assert figures["stack_rps_c1"] == pytest.approx(59.667, rel=1e-3)
    assert "stack_over_engine" not in figures
    assert any(note.startswith("stack c=64 refused") for note in result.notes)
    assert any("target stack_over_plain refused" in note for note in result.notes)
    levels = next(t for t in result.tables if t.title.startswith("HTTP set-ups"))
    refused = {(row[0], row[1]) for row in levels.rows if row[-1].startswith("refused")}
    assert refused == {("stack", 64), ("rayserve", 64)}
    throughput = next(c for c in result.charts if c.file == "embeddings-throughput.png")
    assert throughput.series["stack"] == [(1.0, pytest.approx(59.667, rel=1e-3))]


def test_a_skipped_rayserve_leaves_its_ratio_out_with_a_note_and_the_rest_in() -> None:
    raw = _raw()
    del raw["setups"]["rayserve"]
    raw["config"]["skip_rayserve"] = True
    result = section(raw)
    names = {f.name.removeprefix("embeddings.") for f in result.figures}
    assert not [name for name in names if "rayserve" in name]
    assert {"stack_vs_plain_c64", "stack_vs_engine_b32_c64", "stack_added_p50_ms_c1"} <= names
    assert "rayserve not measured (--skip-rayserve): its figures are left out" in result.notes


def test_a_rayserve_that_failed_to_start_is_a_note_not_an_exception() -> None:
    raw = _raw()
    raw["setups"]["rayserve"] = {
        "levels": [],
        "error": "rayserve not ready after 240 s\n--- stderr tail ---\n...",
    }
    result = section(raw)
    assert "rayserve failed: rayserve not ready after 240 s" in result.notes
    assert "embeddings.stack_vs_rayserve_c64" not in {f.name for f in result.figures}
    assert "embeddings.stack_vs_plain_c64" in {f.name for f in result.figures}


def test_an_empty_raw_json_gives_a_section_of_notes() -> None:
    result = section({})
    assert result.figures == []
    assert any("ceiling was not measured" in note for note in result.notes)
    assert any(note.startswith("stack not measured") for note in result.notes)


# ---- the batch-size histogram -----------------------------------------------------------------


def test_batch_sizes_between_two_readings_are_per_bucket_counts_in_the_window() -> None:
    before = HistogramReading(cumulative={1.0: 2, 2.0: 3, math.inf: 3}, sum=4.0)
    after = HistogramReading(cumulative={1.0: 5, 2.0: 9, math.inf: 10}, sum=25.0)
    # cumulative in the window (3, 6, 7) -> per bucket (3, 3, 1); 21 inputs in 7 runs
    assert batch_sizes_between(before, after) == BatchSizes(
        le=(1.0, 2.0), counts=(3, 3, 1), inputs=21.0
    )


def test_a_histogram_with_no_runs_before_the_window_counts_from_zero() -> None:
    after = HistogramReading(cumulative={1.0: 1, 2.0: 1, math.inf: 1}, sum=1.0)
    empty = HistogramReading(cumulative={}, sum=0.0)
    assert batch_sizes_between(empty, after).counts == (1, 0, 0)


def test_a_count_that_went_down_is_a_restarted_replica_not_a_histogram() -> None:
    before = HistogramReading(cumulative={1.0: 5, math.inf: 9}, sum=20.0)
    after = HistogramReading(cumulative={1.0: 1, math.inf: 2}, sum=3.0)
    with pytest.raises(ValueError, match="went down"):
        batch_sizes_between(before, after)


class _Replicas(Collector):
    """What a sidecar exports for these replicas' stats documents."""

    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.documents = documents

    def collect(self) -> Iterator[Any]:
        families = Families()
        for document in self.documents:
            export_replica(families, document, node="n1")
        yield from families.collect()


def _sidecar_text(batches_by_replica: dict[str, list[int]]) -> str:
    documents = []
    for replica, batches in batches_by_replica.items():
        histogram = Histogram(BATCH_SIZE_BUCKETS)
        for batch in batches:
            histogram.observe(batch)
        documents.append(
            {
                "kind": "rows",
                "replica": replica,
                "app": "loom.minilm@1",
                "models": [
                    {
                        "model": "minilm",
                        "version": "1",
                        "histograms": {"batch_size": histogram.as_json()},
                    }
                ],
            }
        )
    registry = CollectorRegistry()
    registry.register(_Replicas(documents))
    return generate_latest(registry).decode()


def test_the_sidecars_batch_size_text_is_summed_over_replicas_and_diffed() -> None:
    before = batch_size_reading(_sidecar_text({"a": [1], "b": [32]}), "minilm")
    after = batch_size_reading(_sidecar_text({"a": [1, 3, 3], "b": [32, 32, 40]}), "minilm")
    sizes = batch_sizes_between(before, after)
    assert sizes.le == tuple(float(le) for le in BATCH_SIZE_BUCKETS)
    # in the window: two runs of 3 (bucket <= 4), one of 32 (<= 32), one of 40 (<= 48)
    assert {sizes.le[i]: c for i, c in enumerate(sizes.counts) if c} == {4.0: 2, 32.0: 1, 48.0: 1}
    assert sizes.inputs == 3 + 3 + 32 + 40
    assert batch_size_reading(_sidecar_text({"a": [1]}), "other").cumulative == {}


def test_the_recorded_stack_levels_carry_a_batch_size_table_and_chart() -> None:
    result = section(_raw())
    chart = next(c for c in result.charts if c.file == "embeddings-batch-sizes.png")
    assert (chart.kind, list(chart.bars)) == ("bar", ["stack c=1", "stack c=64"])
    for shares in chart.bars.values():
        assert sum(s for s in shares if s is not None) == pytest.approx(100.0)
    assert len(chart.categories) == len(chart.bars["stack c=1"])


def test_without_batch_sizes_the_chart_is_left_out_with_a_note() -> None:
    raw = _raw()
    for level in raw["setups"]["stack"]["levels"]:
        level.pop("batch_sizes", None)
    result = section(raw)
    assert [c.file for c in result.charts] == [
        "embeddings-throughput.png",
        "embeddings-latency.png",
    ]
    assert any("no batch-size chart" in note for note in result.notes)


# ---- charts -----------------------------------------------------------------------------------


def test_the_charts_are_drawn_as_pngs_into_the_run_folder(tmp_path: Path) -> None:
    written = draw_charts([section(_raw())], tmp_path)
    assert written == [
        "embeddings-throughput.png",
        "embeddings-latency.png",
        "embeddings-batch-sizes.png",
    ]
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- open loop --------------------------------------------------------------------------------


def test_open_loop_rates_are_shares_of_the_set_ups_own_best_closed_loop_rate() -> None:
    raw = _raw()
    stack_levels = [level_from_json(level) for level in raw["setups"]["stack"]["levels"]]
    best = max(level.req_per_s for level in stack_levels)  # 416.3 req/s at c=64

    assert open_loop_rates(stack_levels, (0.5, 0.9)) == pytest.approx([0.5 * best, 0.9 * best])
    assert open_loop_rates([], (0.5,)) == []
    assert parse_shares("0.5, 0.9") == (0.5, 0.9)
    assert parse_shares("") == ()


def test_open_loop_levels_give_a_table_a_chart_and_the_stacks_p99_near_capacity() -> None:
    raw = _raw()
    raw["setups"]["stack"]["open_levels"] = [
        {"share": 0.5, "offered_rate_per_s": 208.0, "achieved_rate_per_s": 207.0,
         "requests": 621, "errors": 0, "p50_ms": 20.0, "p95_ms": 40.0, "p99_ms": 55.0},
        {"share": 0.9, "offered_rate_per_s": 375.0, "achieved_rate_per_s": 370.0,
         "requests": 1110, "errors": 0, "p50_ms": 60.0, "p95_ms": 180.0, "p99_ms": 260.0},
    ]  # fmt: skip
    raw["setups"]["plain"]["open_levels"] = []

    result = section(raw)

    figure = next(f for f in result.figures if f.name == "embeddings.stack_open_p99_ms_at_90pct")
    assert (figure.value, figure.unit, figure.better) == (260.0, "ms", "lower")
    table = next(t for t in result.tables if t.title.startswith("Open loop"))
    assert [row[:2] for row in table.rows] == [("stack", "50%"), ("stack", "90%")]
    chart = next(c for c in result.charts if c.file == "embeddings-open-loop.png")
    assert chart.series == {"stack": [(208.0, 55.0), (375.0, 260.0)]}
    assert not any(c.file == "embeddings-open-loop.png" for c in section(_raw()).charts)
