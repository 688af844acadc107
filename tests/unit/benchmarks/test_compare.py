"""``benchmarks.compare`` on two recorded runs (``recorded/run_a.json``, ``run_b.json``):
ratios oriented so that above 1 is better, the facts that differ, the CI verdict, and bad
input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.compare import (
    RunError,
    compare,
    format_comparison,
    load_run,
    read_run,
)

RECORDED = Path(__file__).parent / "recorded"


def recorded() -> tuple[str, str]:
    return str(RECORDED / "run_a.json"), str(RECORDED / "run_b.json")


def ratios() -> dict[str, float | None]:
    a, b = recorded()
    return {row.name: row.ratio for row in compare(load_run(Path(a)), load_run(Path(b))).rows}


def test_a_ratio_is_above_one_when_b_is_better_whichever_way_the_figure_points() -> None:
    found = ratios()

    assert found["stack_rps_c64"] == pytest.approx(170 / 200)  # fewer req/s: 0.85, worse
    assert found["added_p50_ms_c1"] == pytest.approx(6 / 5)  # 6 ms -> 5 ms: 1.2, better
    assert found["stack_vs_ray_serve_c64"] == pytest.approx(1.0)


def test_a_figure_only_one_run_has_is_listed_without_a_ratio_and_never_fails_the_gate() -> None:
    a, b = recorded()
    comparison = compare(load_run(Path(a)), load_run(Path(b)))

    rows = {row.name: row for row in comparison.rows}
    assert (rows["engine_rps_b32"].a, rows["engine_rps_b32"].b) == (230.0, None)
    assert (rows["gpu_tokens_per_s"].a, rows["gpu_tokens_per_s"].b) == (None, 9000.0)
    assert rows["gpu_tokens_per_s"].ratio is None
    assert [row.name for row in comparison.rows][-1] == "gpu_tokens_per_s"  # B's new last
    # the gate: 0.85 is under 0.9, nothing is under 0.8
    assert [row.name for row in comparison.below(0.9)] == ["stack_rps_c64"]
    assert comparison.below(0.8) == []
    assert comparison.worst_ratio == pytest.approx(0.85)


def test_the_facts_that_differ_are_listed_and_the_momentary_ones_left_out() -> None:
    a, b = recorded()

    differences = compare(load_run(Path(a)), load_run(Path(b))).differences

    assert differences == (
        ("git_commit", "aaaa", "bbbb"),
        ("git_dirty", "False", "True"),
        ("versions.ray", "2.60.0", "2.60.1"),
    )  # not date_utc, hostname or load_avg_1m: they differ between any two runs


def test_the_table_shows_each_figure_both_values_and_the_ratio() -> None:
    a, b = recorded()

    text = format_comparison(compare(load_run(Path(a)), load_run(Path(b))))

    lines = text.splitlines()
    assert lines[0] == f"A: {a}"
    assert lines[3].split() == ["figure", "unit", "A", "B", "B", "vs", "A"]
    assert lines[4].split() == ["stack_rps_c64", "req/s", "200", "170", "0.85x"]
    assert lines[5].split() == ["added_p50_ms_c1", "ms", "6", "5", "1.20x"]
    assert "  versions.ray: 2.60.0 -> 2.60.1" in lines


def test_a_run_folder_is_read_through_its_result_json(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text((RECORDED / "run_a.json").read_text())

    assert load_run(tmp_path).figures["stack_rps_c64"].value == 200.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"machine": {}}, "no figures list"),
        ({"figures": [{"value": 1}]}, "figures.0: a figure needs a name"),
        ({"figures": [{"name": "x", "value": "fast"}]}, "figures.0: a figure needs"),
        ({"figures": [{"name": "x", "value": 1, "better": "up"}]}, "better is higher or lower"),
        ({"figures": [{"name": "x", "value": 1}, {"name": "x", "value": 2}]}, "twice"),
    ],
)
def test_a_result_that_is_not_a_run_is_refused_naming_what_is_wrong(
    data: object, message: str
) -> None:
    with pytest.raises(RunError, match=message):
        read_run(data, "run-x")


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "result.json"
    broken.write_text("{not json")

    with pytest.raises(RunError, match="not JSON"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="cannot read it"):
        load_run(tmp_path / "missing.json")
    assert json.loads((RECORDED / "run_b.json").read_text())["figures"]  # the fixture reads
