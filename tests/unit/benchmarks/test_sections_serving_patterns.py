"""The serving-pattern benchmarks' sections (ensemble, sharding, faults, autoscaling), built
from their modules' JSON recorded in quick runs (``recorded/<name>.json``, trimmed): the
headline figures with their units and goals, a missing part as a note with the rest still
reported, nothing recorded as a failed section, and the charts drawn as PNGs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.plots import draw_charts
from benchmarks.result import Figure, Section
from benchmarks.sections import extract

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / f"{name}.json").read_text())


def figures(section: Section) -> dict[str, Figure]:
    return {f.name.removeprefix(f"{section.name}."): f for f in section.figures}


@pytest.mark.parametrize("name", ["ensemble", "sharding", "faults", "autoscaling"])
def test_nothing_recorded_fails_the_section_and_says_so(name: str) -> None:
    section = extract(name, {})

    assert (section.status, section.figures) == ("failed", [])
    assert section.error is not None
    assert name in section.error


@pytest.mark.parametrize("name", ["ensemble", "sharding", "faults", "autoscaling"])
def test_a_recorded_run_is_ok_and_left_unchanged(name: str) -> None:
    raw = recorded(name)
    before = copy.deepcopy(raw)

    section = extract(name, raw)

    assert (section.status, section.error) == ("ok", None)
    assert section.figures
    assert section.tables
    assert raw == before


def test_the_charts_are_drawn_as_pngs(tmp_path: Path) -> None:
    sections = [extract(n, recorded(n)) for n in ("ensemble", "sharding", "autoscaling")]

    written = draw_charts(sections, tmp_path)

    expected = [
        "ensemble-latency.png",
        "sharding-throughput.png",
        "sharding-loads.png",
        "autoscaling-replicas.png",
        "autoscaling-p95.png",
    ]
    assert written == expected
    assert all((tmp_path / file).read_bytes().startswith(b"\x89PNG") for file in expected)


# ---- ensemble ---------------------------------------------------------------------------------


def test_ensemble_ratios_are_per_level_and_the_target_carries_its_goal_at_the_first() -> None:
    raw = recorded("ensemble")
    ratios = raw["levels"]["1"]["ratios"]

    found = figures(extract("ensemble", raw))

    target = found["hedged_over_unhedged_p99_c1"]
    assert target.value == ratios["hedged_over_unhedged_p99"]
    assert (target.unit, target.better, target.goal) == ("x", "lower", "<= 0.5")
    assert target.met == (target.value <= 0.5)
    cost = found["ensemble_over_slowest_member_p99_c1"]
    assert (cost.value, cost.goal) == (ratios["ensemble_over_slowest_member_p99"], None)
    assert "hedged_over_unhedged_p99" not in found  # the target is the c1 figure, not a second


def test_ensemble_hedges_per_request_count_warm_up_and_window_on_both_sides() -> None:
    raw = recorded("ensemble")
    raw["settings"] |= {"warmup_s": 1.0, "duration_s": 4.0}
    level = raw["levels"]["1"]
    level["hedged"]["requests_per_s"] = 60.0
    level["hedges"][level["hedged"]["model"]] = {"sent": 15.0, "won": 9.0}

    found = figures(extract("ensemble", raw))

    # 15 sent / (60 req/s x (1 s warm-up + 4 s window)) = 0.05
    assert found["hedged_hedges_per_request_c1"].value == pytest.approx(0.05)
    assert found["hedged_hedges_per_request_c1"].unit == "hedges/request"


def test_ensemble_level_without_its_straggler_runs_keeps_the_clean_figures_and_says_so() -> None:
    raw = recorded("ensemble")
    level = raw["levels"]["1"]
    for key in ("unhedged", "hedged", "hedged_fixed", "hedges"):
        del level[key]
    level["ratios"]["hedged_over_unhedged_p99"] = None
    level["ratios"]["hedged_fixed_over_unhedged_p99"] = None
    raw["targets"][0]["value"] = None

    section = extract("ensemble", raw)

    found = figures(section)
    assert "ensemble_over_slowest_member_p99_c1" in found
    assert "hedged_over_unhedged_p99_c1" not in found
    assert section.status == "ok"
    assert any("not recorded" in note and "unhedged" in note for note in section.notes)
    assert any("hedged_over_unhedged_p99" in note for note in section.notes)


def test_ensemble_table_has_a_row_per_run_and_the_chart_a_bar_set_per_run() -> None:
    section = extract("ensemble", recorded("ensemble"))

    (table,) = section.tables
    (chart,) = section.charts
    # 3 members alone + the clean ensemble + unhedged, hedged at p95, hedged after 2 x p50
    assert len(table.rows) == 7
    assert (chart.kind, chart.categories, len(chart.bars)) == ("bar", ["p50", "p95", "p99"], 7)


# ---- sharding ---------------------------------------------------------------------------------


def test_sharding_ratios_and_loads_per_setup_from_a_quick_run_that_loaded_nothing() -> None:
    raw = recorded("sharding")

    section = extract("sharding", raw)

    found = figures(section)
    throughput = found["four_shards_over_one_shard_requests_per_s"]
    assert (throughput.value, throughput.better) == (
        raw["ratios"]["four_shards_over_one_shard_requests_per_s"],
        "higher",
    )
    loads = found["one_shard_loads_per_1000_requests"]
    assert (loads.value, loads.unit, loads.better) == (0.0, "loads/1000 requests", "lower")
    assert "four_shards_loads_per_1000_requests" in found
    # 8 models under a budget of 8: one shard missed nothing once warm, so 0 / 0 has no value
    assert "four_shards_over_one_shard_loads" not in found
    assert section.notes == [
        "four_shards_over_one_shard_loads: not measured (one-shard loaded no model once warm: "
        "8 models fit its budget of 8)"
    ]


def test_sharding_loads_ratio_carries_the_modules_goal() -> None:
    raw = recorded("sharding")
    raw["ratios"]["four_shards_over_one_shard_loads"] = 0.05  # 2 loads / 40
    raw["targets"][0]["value"] = 0.05

    target = figures(extract("sharding", raw))["four_shards_over_one_shard_loads"]

    assert (target.value, target.goal, target.better, target.met) == (0.05, "<= 0.1", "lower", True)


def test_sharding_missing_setup_is_a_note_and_its_ratios_are_left_out() -> None:
    raw = recorded("sharding")
    del raw["setups"]["one-shard-4-replicas"]
    raw["ratios"]["four_shards_over_four_replicas_requests_per_s"] = None

    section = extract("sharding", raw)

    found = figures(section)
    assert "four_shards_over_four_replicas_requests_per_s" not in found
    assert "four_shards_over_one_shard_requests_per_s" in found
    assert any("one-shard-4-replicas" in note for note in section.notes)
    assert section.charts[0].categories == ["one-shard", "four-shards"]


# ---- faults -----------------------------------------------------------------------------------

OVERLOAD = {
    "unloaded": {"requests": 100, "ok": 100, "not_ok": {}, "p50_ms": 8.0, "p99_ms": 20.0},
    "saturated_closed_loop_c64": {
        "requests": 3000, "ok": 3000, "not_ok": {}, "p50_ms": 300.0, "p99_ms": 600.0,
    },
    "capacity_req_per_s": 200.0,
    "offered_req_per_s": 600.0,
    "overload_s": 10.0,
    "overloaded": {
        "requests": 6000, "ok": 1800, "not_ok": {"503": 4140, "unanswered": 60},
        "p50_ms": 20.0, "p99_ms": 30.0,
    },
    "accepted_req_per_s": 180.0,
    "shed_share": 0.69,
    "failed_other_share": 0.01,
    "accepted_p99_over_unloaded_p99": 1.5,
    "rss_mib_before": {"gateway": 200.0, "replicas": 800.0},
    "rss_mib_after": {"gateway": 240.0, "replicas": 800.0},
    "rss_after_over_before": {"gateway": 1.2, "replicas": 1.0},
    "rss_mib_settled": {"gateway": 230.0, "replicas": 800.0},
}  # fmt: skip
"""An overload scenario in the module's shape: 6000 arrivals in 10 s at 3 x 200 req/s."""


def test_faults_kill_figures_hold_failed_requests_to_zero() -> None:
    raw = recorded("faults")

    found = figures(extract("faults", raw))

    failed = found["kill_failed_requests"]
    assert (failed.value, failed.unit, failed.goal) == (
        raw["kill"]["failed_requests"],
        "requests",
        "<= 0",
    )
    assert failed.met == (raw["kill"]["failed_requests"] == 0)
    assert found["kill_p99_after_over_before"].value == raw["kill"]["p99_after_over_before"]
    assert not any(name.startswith("overload_") for name in found)


def test_faults_overload_figures_when_it_ran() -> None:
    raw = recorded("faults") | {"overload": OVERLOAD}

    section = extract("faults", raw)

    found = figures(section)
    assert found["overload_accepted_over_capacity"].value == pytest.approx(0.9)  # 180 / 200
    assert found["overload_failed_other_share"].met is False  # 0.01 > 0
    assert found["overload_accepted_p99_over_unloaded_p99"].met is True  # 1.5 <= 2
    assert found["overload_gateway_rss_after_over_before"].met is False  # 1.2 > 1.1
    assert found["overload_replicas_rss_after_over_before"].met is True
    assert [t.title.split(":")[0] for t in section.tables] == [
        "Replica killed under load",
        "Overload",
    ]


def test_faults_scenario_asked_for_and_not_recorded_is_a_note() -> None:
    raw = recorded("faults")
    raw["args"]["scenarios"] = "kill,overload"

    section = extract("faults", raw)

    assert section.status == "ok"
    assert section.notes == ["overload: asked for, not recorded"]
    assert "kill_failed_requests" in figures(section)


# ---- autoscaling ------------------------------------------------------------------------------


def test_autoscaling_figures_per_setup_with_the_modules_goals() -> None:
    raw = recorded("autoscaling")
    (run,) = raw["setups"]

    found = figures(extract("autoscaling", raw))

    reaction = found["loom_sidecars_reaction_s"]
    assert (reaction.value, reaction.unit, reaction.goal) == (run["reaction_s"], "s", "<= 15")
    step = found["loom_sidecars_step_p95_ms"]
    assert (step.value, step.goal) == (run["step_p95_ms"], f"<= {run['slo_ms']:g}")
    assert found["loom_sidecars_sidecar_cpu_share"].better == "lower"
    cost = found["policy_decide_us_per_call"]
    assert (cost.value, cost.unit) == (raw["policy_cost"]["decide_us_per_call"], "us")


def test_autoscaling_charts_are_timelines_from_the_load_step() -> None:
    raw = recorded("autoscaling")
    (run,) = raw["setups"]

    replicas, p95 = extract("autoscaling", raw).charts

    assert (replicas.kind, replicas.vlines) == ("step", {"load step": 0.0})
    assert replicas.series["loom-sidecars"] == [tuple(p) for p in run["timeline"]["replicas"]]
    assert (p95.kind, p95.hlines) == ("line", {"SLO": run["slo_ms"]})


def test_autoscaling_skipped_setup_is_a_note_and_the_rest_reported() -> None:
    raw = recorded("autoscaling")
    raw["args"]["setups"] = "loom-sidecars,loom-prometheus"
    raw["setups"][0]["reaction_s"] = None

    section = extract("autoscaling", raw)

    found = figures(section)
    assert "loom_sidecars_reaction_s" not in found
    assert "loom_sidecars_step_p95_ms" in found
    assert not any(name.startswith("loom_prometheus") for name in found)
    assert any(note.startswith("loom-prometheus: skipped") for note in section.notes)
    assert any("no second replica" in note for note in section.notes)
