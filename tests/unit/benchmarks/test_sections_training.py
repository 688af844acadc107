"""``benchmarks.sections.training`` on a recorded quick run (``recorded/training.json``:
``--quick --workers 1`` on 2 cores, trimmed): the bare loop's and the job's samples/s, the job's
share of the baseline, the module's overhead targets with their goals, the speed-up where two
worker counts ran, the loss curve, a run without a baseline, and both charts drawn."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.plots import draw_charts
from benchmarks.result import Figure, Section
from benchmarks.sections import extract
from benchmarks.sections.training import section

RECORDED = Path(__file__).parent / "recorded" / "training.json"


def recorded() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(RECORDED.read_text())
    return raw


def figures(result: Section) -> dict[str, Figure]:
    return {figure.name.removeprefix("training."): figure for figure in result.figures}


def test_the_bare_loop_and_the_job_report_samples_per_s_and_their_ratio() -> None:
    found = figures(section(recorded()))

    assert found["bare_loop_samples_per_s"].value == pytest.approx(70.6817)  # (65.87 + 75.50) / 2
    assert found["job_w1_stage_samples_per_s"].value == pytest.approx(44.9864)
    assert found["job_w1_loop_samples_per_s"].unit == "samples/s"
    assert found["job_w1_stage_over_bare"].value == pytest.approx(44.9864 / 70.6817)  # 0.64
    assert found["job_w1_loop_over_bare"].value == pytest.approx(65.0823 / 70.6817)  # 0.92


def test_the_module_overhead_targets_become_figures_with_their_goals() -> None:
    found = figures(section(recorded()))

    loop = found["job_w1_loop_overhead"]  # 1 - 0.921 = 7.9%, within 10%
    assert loop.value == pytest.approx(0.0792)
    assert (loop.unit, loop.better, loop.goal, loop.met) == ("share", "lower", "<= 0.1", True)
    stage = found["job_w1_stage_overhead"]  # 1 - 0.636 = 36%: the ~4.4 s start-up counts
    assert stage.value == pytest.approx(0.3635)
    assert stage.met is False


def test_speedup_is_reported_only_where_two_worker_counts_ran() -> None:
    assert "speedup_2_over_1" not in figures(section(recorded()))
    raw = recorded()
    two = copy.deepcopy(raw["jobs"][0]) | {"workers": 2, "stage_samples_per_s": 72.0}
    raw["jobs"].append(two)
    raw["speedup_2_over_1"] = 72.0 / 44.9864

    found = figures(section(raw))

    assert found["speedup_2_over_1"].value == pytest.approx(1.6005, abs=1e-4)  # 72.0 / 44.99
    assert found["job_w2_stage_over_bare"].value == pytest.approx(72.0 / 70.6817)


def test_the_loss_curve_is_one_line_while_the_runs_agree_and_two_when_they_differ() -> None:
    raw = recorded()
    (chart,) = [c for c in section(raw).charts if c.file == "training-loss.png"]
    assert list(chart.series) == ["bare loop"]  # same seed and data: identical curves
    assert len(chart.series["bare loop"]) == 40  # --quick: 40 steps, counted from 1
    assert chart.series["bare loop"][0] == (1, 8.3458)
    assert figures(section(raw))["bare_loop_final_loss"].value == pytest.approx(6.5872)

    raw["bare_loop"]["runs"][1]["loss"][-1][1] = 6.6
    (chart,) = [c for c in section(raw).charts if c.file == "training-loss.png"]

    assert list(chart.series) == ["bare loop", "bare loop, after the jobs"]


def test_a_run_without_a_loss_curve_has_no_loss_chart_and_says_so() -> None:
    raw = recorded()
    for run in raw["bare_loop"]["runs"]:
        del run["loss"]

    result = section(raw)

    assert [c.file for c in result.charts] == ["training-samples-per-s.png"]
    assert "bare_loop_final_loss" not in figures(result)
    assert any(note.startswith("no loss curve") for note in result.notes)


def test_without_a_bare_loop_the_jobs_still_report_and_the_ratios_are_left_out() -> None:
    raw = recorded()
    raw["bare_loop"] = {}
    for target in raw["targets"]:
        target["value"] = None

    result = section(raw)
    found = figures(result)

    assert found["job_w1_stage_samples_per_s"].value == pytest.approx(44.9864)
    assert not any(name.endswith(("_over_bare", "_overhead")) for name in found)
    assert "no bare loop measured: the jobs' ratios to it are left out" in result.notes
    assert any(note.startswith("job_w1_loop_overhead: not measured") for note in result.notes)
    (bars,) = result.charts
    assert bars.categories == ["job W=1"]


def test_the_registry_extracts_it_and_both_charts_are_drawn(tmp_path: Path) -> None:
    result = extract("training", recorded())

    written = draw_charts([result], tmp_path)

    assert written == ["training-loss.png", "training-samples-per-s.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)
