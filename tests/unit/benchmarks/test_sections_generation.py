"""``benchmarks.sections.generation`` on a recorded quick run (``recorded/generation.json``:
``--quick --concurrency 1,8`` on 2 cores, trimmed): each variant's tokens/s at its highest
concurrency, the module's targets with their goals, a failed variant named in the notes while
the rest still report, and both charts drawn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.plots import draw_charts
from benchmarks.result import Figure, Section
from benchmarks.sections import extract
from benchmarks.sections.generation import section

RECORDED = Path(__file__).parent / "recorded" / "generation.json"


def recorded() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(RECORDED.read_text())
    return raw


def figures(result: Section) -> dict[str, Figure]:
    return {figure.name.removeprefix("generation."): figure for figure in result.figures}


def test_each_variant_reports_its_tokens_per_s_at_its_highest_concurrency() -> None:
    found = figures(section(recorded()))

    # levels 1 and 8: every variant's figure is its c=8 row
    assert found["sequential_c8_tokens_per_s"].value == pytest.approx(215.6628)
    assert found["static_c8_tokens_per_s"].value == pytest.approx(508.2787)
    assert found["cb_c8_tokens_per_s"].value == pytest.approx(759.7581)
    assert found["stack_c8_tokens_per_s"].value == pytest.approx(587.4044)
    assert {found[f"{v}_c8_tokens_per_s"].unit for v in ("sequential", "stack")} == {"tokens/s"}


def test_the_module_targets_become_figures_with_their_goals() -> None:
    found = figures(section(recorded()))

    share = found["stack_share_of_cb"]  # 587.4 / 759.8 = 0.773, under the 0.8 goal
    assert share.value == pytest.approx(0.7731)
    assert (share.goal, share.met) == (">= 0.8", False)
    growth = found["stack_ttft_growth"]  # 40.45 ms / 20.87 ms = 1.94, within 2
    assert (growth.better, growth.goal, growth.met) == ("lower", "<= 2", True)


def test_a_target_the_run_could_not_measure_is_a_note_not_a_figure() -> None:
    result = section(recorded())  # stack_over_sequential is at c=32; this run went to c=8

    assert "stack_over_sequential" not in figures(result)
    assert any(note.startswith("stack_over_sequential: not measured") for note in result.notes)


def test_stack_over_static_and_the_stack_ttft_with_one_client() -> None:
    found = figures(section(recorded()))

    # at c=8, the highest level both ran: 587.4044 / 508.2787 = 1.156
    assert found["stack_over_static"].value == pytest.approx(587.4044 / 508.2787)
    ttft = found["stack_c1_ttft_p50_ms"]
    assert ttft.value == pytest.approx(20.8719)
    assert (ttft.unit, ttft.better) == ("ms", "lower")


def test_a_failed_variant_is_named_in_the_notes_and_every_other_still_reports() -> None:
    raw = recorded()
    raw["variants"]["stack"]["error"] = "the stack exited"
    raw["variants"]["stack"]["levels"] = raw["variants"]["stack"]["levels"][:1]  # c=1 only
    raw["variants"]["cb"] = {"levels": [], "error": "AttributeError: no init_continuous_batching"}

    result = section(raw)
    found = figures(result)

    assert "stack: failed: the stack exited (1 level(s) measured before it)" in result.notes
    assert any(note.startswith("cb: failed: AttributeError") for note in result.notes)
    assert "stack_c1_tokens_per_s" in found  # what it measured before failing
    assert not any(name.startswith("cb_") for name in found)
    assert found["static_c8_tokens_per_s"].value == pytest.approx(508.2787)
    lines = set(result.charts[0].series)
    assert lines == {"sequential generate", "static batching", "Loom stack"}


def test_the_table_has_one_row_per_variant_and_level() -> None:
    (table,) = section(recorded()).tables

    assert len(table.rows) == 4 * 2  # 4 variants x levels 1, 8
    stack_c8 = next(row for row in table.rows if row[:2] == ("Loom stack", 8))
    assert dict(zip(table.columns, stack_c8, strict=True))["TTFT p95 ms"] == 82.8
    assert "c=8 0.78" in (table.note or "")  # static batching's useful token share


def test_a_variant_without_ttft_has_no_line_in_the_ttft_chart() -> None:
    raw = recorded()
    for level in raw["variants"]["static"]["levels"]:
        level["ttft_p50_ms"] = level["ttft_p95_ms"] = None

    tokens, ttft = section(raw).charts

    assert "static batching" in tokens.series
    assert "static batching" not in ttft.series
    assert ttft.log_y
    assert tokens.log_x


def test_the_registry_extracts_it_and_both_charts_are_drawn(tmp_path: Path) -> None:
    result = extract("generation", recorded())

    written = draw_charts([result], tmp_path)

    assert written == ["generation-tokens-per-s.png", "generation-ttft.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)
