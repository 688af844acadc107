"""The sharding benchmark's section (``benchmarks.sharding``'s JSON): many small models under
a per-replica budget, served by one pool replica, the same pool on 4 replicas, and 4 shards
keyed by model name; the ring against the pool in requests/s and in model loads.

    section = section(json.loads(Path("raw/sharding.json").read_text()))
    [f.name for f in section.figures]   # sharding.four_shards_over_one_shard_loads, ...

The module's target (4 shards / 1 shard model loads, goal <= 0.1) is the ratio of its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.result import Better, Chart, Section, Table, better_of, rounded

SETUPS = ("one-shard", "one-shard-4-replicas", "four-shards")
"""The module's set-ups, in its order."""
RATIOS: tuple[tuple[str, Better], ...] = (
    ("four_shards_over_one_shard_requests_per_s", "higher"),
    ("four_shards_over_four_replicas_requests_per_s", "higher"),
    ("four_shards_over_one_shard_loads", "lower"),
)


def _figure_key(setup: str) -> str:
    """``one-shard-4-replicas`` -> ``one_shard_4_replicas``: figure names use underscores."""
    return setup.replace("-", "_")


def _table(setups: Mapping[str, Mapping[str, Any]]) -> Table:
    return Table(
        title="Sharding: one pool replica, the pool on 4 replicas, 4 shards keyed by model",
        columns=(
            "set-up",
            "replicas",
            "shards",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "model loads in the run",
            "loads per 1000 requests",
            "errors",
        ),
        rows=[
            (
                name,
                (run.get("setup") or {}).get("replicas"),
                (run.get("setup") or {}).get("shards"),
                rounded(run.get("requests_per_s"), 1),
                rounded(run.get("p50_ms"), 2),
                rounded(run.get("p95_ms"), 2),
                rounded(run.get("p99_ms"), 2),
                run.get("model_loads_during_run"),
                rounded(run.get("loads_per_1000_requests"), 2),
                run.get("errors"),
            )
            for name, run in setups.items()
        ],
        note="model loads: loom_model_loads_total (a pool replica's multiplexing cache misses) "
        "after a warm pass that asked every model once",
    )


def _why_no_ratio(name: str, raw: Mapping[str, Any]) -> str:
    """Why a ratio of the module's is None: a set-up missing, or its divisor 0."""
    setups, settings = raw.get("setups") or {}, raw.get("settings") or {}
    divisor = "one-shard-4-replicas" if "four_replicas" in name else "one-shard"
    if "four-shards" not in setups or divisor not in setups:
        return "a set-up not recorded"
    if not name.endswith("_loads"):
        return f"{divisor} answered nothing"
    models, budget = settings.get("models"), settings.get("budget")
    if models is not None and budget is not None and models <= budget:
        return f"{divisor} loaded no model once warm: {models} models fit its budget of {budget}"
    return f"{divisor} loaded no model once warm, so the ratio has no divisor"


def _bar_chart(
    setups: Mapping[str, Mapping[str, Any]], key: str, file: str, title: str, y_label: str
) -> Chart:
    return Chart(
        file=file,
        title=title,
        x_label="set-up",
        y_label=y_label,
        kind="bar",
        categories=list(setups),
        bars={y_label: [run.get(key) for run in setups.values()]},
    )


def section(raw: Mapping[str, Any]) -> Section:
    """``failed`` when no set-up was recorded; a set-up missing is a note, and the ratios
    it divides are left out."""
    result = Section(name="sharding")
    setups = {k: v for k, v in (raw.get("setups") or {}).items() if isinstance(v, Mapping)}
    if not setups:
        result.status, result.error = "failed", "the sharding module recorded no set-up"
        return result
    missing = [name for name in SETUPS if name not in setups]
    if missing:
        result.notes.append(f"not recorded: {', '.join(missing)}")
    targets = {
        t["name"]: t
        for t in raw.get("targets") or []
        if isinstance(t, Mapping) and "name" in t and t.get("goal") is not None
    }
    ratios = raw.get("ratios") or {}
    for name, better in RATIOS:
        target = targets.pop(name, None)
        goal = None if target is None else target["goal"]
        if result.figure(name, ratios.get(name), "x", better=better, goal=goal) is None:
            result.notes.append(f"{name}: not measured ({_why_no_ratio(name, raw)})")
    for name, target in targets.items():  # a target that is none of the ratios
        better = better_of(target.get("comparison"))
        result.figure(name, target.get("value"), "x", better=better, goal=target["goal"])
    for name, run in setups.items():
        result.figure(
            f"{_figure_key(name)}_loads_per_1000_requests",
            run.get("loads_per_1000_requests"),
            "loads/1000 requests",
            better="lower",
        )
        if run.get("errors"):
            result.notes.append(f"{name}: {run['errors']} errors {run.get('error_kinds')}")
    result.tables.append(_table(setups))
    result.charts.append(
        _bar_chart(
            setups,
            "requests_per_s",
            "sharding-throughput.png",
            "Sharding: requests/s by set-up, models drawn uniformly",
            "requests/s",
        )
    )
    result.charts.append(
        _bar_chart(
            setups,
            "loads_per_1000_requests",
            "sharding-loads.png",
            "Sharding: model loads per 1000 requests once warm (lower is better)",
            "loads per 1000 requests",
        )
    )
    return result
