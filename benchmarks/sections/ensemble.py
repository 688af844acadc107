"""The ensemble benchmark's section (``benchmarks.ensemble``'s JSON): per concurrency level,
what the scatter/gather costs over its slowest member alone, and what hedging does to the p99
when member 3 straggles.

    section = section(json.loads(Path("raw/ensemble.json").read_text()))
    [f.name for f in section.figures]   # ensemble.ensemble_over_slowest_member_p99_c1, ...

Figures carry the level in their name (``_c1``); the module's target (hedged / unhedged p99,
read at the first level) is the figure of that name at that level, with its goal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.result import Chart, Section, Table, better_of, rounded

RUNS = (
    ("ensemble", "ensemble"),
    ("unhedged", "straggler, unhedged"),
    ("hedged", "straggler, hedged at p95"),
    ("hedged_fixed", "straggler, hedged after 2 x p50"),
)
"""The level's ensemble runs in the order measured: (key in the level, label)."""
RATIOS = (
    ("ensemble_over_slowest_member_p50", "x"),
    ("ensemble_over_slowest_member_p99", "x"),
    ("hedged_over_unhedged_p99", "x"),
    ("hedged_fixed_over_unhedged_p99", "x"),
)
PERCENTILES = ("p50", "p95", "p99")


def _runs(level: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, measurement) of everything measured at a level: each member alone, then the
    ensemble runs; a run not recorded is left out."""
    alone = level.get("members_alone") or {}
    runs = [(f"{member} alone", run) for member, run in alone.items()]
    runs += [(label, level.get(key)) for key, label in RUNS]
    return [(label, run) for label, run in runs if isinstance(run, Mapping)]


def _hedges_per_request(
    level: Mapping[str, Any], key: str, settings: Mapping[str, Any]
) -> float | None:
    """Hedges the ensemble sent per request. The server counts hedges over the run's warm-up
    and window, the load generator requests over the window only, so the requests are its
    rate x (warm-up + window): 89 sent / (60.5 req/s x (1 + 4) s) = 0.29."""
    run = level.get(key) or {}
    sent = ((level.get("hedges") or {}).get(run.get("model")) or {}).get("sent")
    seconds = (settings.get("warmup_s") or 0.0) + (settings.get("duration_s") or 0.0)
    if sent is None or not run.get("requests_per_s") or seconds <= 0:
        return None
    return sent / (run["requests_per_s"] * seconds)


def _level_table(c: str, level: Mapping[str, Any]) -> Table:
    faults = level.get("straggler_faults") or {}
    notes = [f"slowest member alone (by p99): {level.get('slowest_member', 'not recorded')}"]
    if faults:
        notes.append(
            f"straggler delayed {faults.get('delay_ms')} ms on "
            f"{100 * (faults.get('delay_probability') or 0):g} % of its calls "
            f"(scope {faults.get('delay_scope', 'call')})"
        )
    notes += [
        f"{name}: {(count or {}).get('sent')} hedges sent, {(count or {}).get('won')} won"
        for name, count in sorted((level.get("hedges") or {}).items())
    ]
    return Table(
        title=f"Ensemble at concurrency {c}: members alone, the ensemble, then member 3 straggling",
        columns=("set-up", "model", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"),
        rows=[
            (
                label,
                run.get("model"),
                rounded(run.get("requests_per_s"), 1),
                *(rounded(run.get(f"{p}_ms"), 2) for p in PERCENTILES),
                run.get("errors"),
            )
            for label, run in _runs(level)
        ],
        note="; ".join(notes) + " (over warm-up and window)",
    )


def _latency_chart(c: str, level: Mapping[str, Any]) -> Chart:
    return Chart(
        file="ensemble-latency.png",
        title=f"Ensemble latency at concurrency {c}: members alone, ensemble, hedging",
        x_label="percentile",
        y_label="latency (ms)",
        kind="bar",
        categories=list(PERCENTILES),
        bars={label: [run.get(f"{p}_ms") for p in PERCENTILES] for label, run in _runs(level)},
    )


def _targets(raw: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The module's targets that name a figure and a goal."""
    return [
        t
        for t in raw.get("targets") or []
        if isinstance(t, Mapping) and "name" in t and t.get("goal") is not None
    ]


def _level(
    result: Section,
    c: str,
    level: Mapping[str, Any],
    goals: dict[str, Mapping[str, Any]],
    settings: Mapping[str, Any],
) -> None:
    """One level's figures (its target's goal popped from ``goals``), notes and table."""
    missing = [label for key, label in RUNS if not isinstance(level.get(key), Mapping)]
    if missing:
        result.notes.append(f"c={c}: not recorded: {', '.join(missing)}")
    for label, run in _runs(level):
        if run.get("errors"):
            result.notes.append(f"c={c} {label}: {run['errors']} errors {run.get('error_kinds')}")
    ratios = level.get("ratios") or {}
    for name, unit in RATIOS:
        target = goals.pop(f"{name}_c{c}", None)
        goal = None if target is None else target["goal"]
        result.figure(f"{name}_c{c}", ratios.get(name), unit, better="lower", goal=goal)
    for key in ("hedged", "hedged_fixed"):
        rate = _hedges_per_request(level, key, settings)
        result.figure(f"{key}_hedges_per_request_c{c}", rate, "hedges/request", better="lower")
    result.tables.append(_level_table(c, level))


def section(raw: Mapping[str, Any]) -> Section:
    """``failed`` when no level recorded a measurement; a level or run missing is a note, a
    level that cannot be read too."""
    result = Section(name="ensemble")
    levels = raw.get("levels") or {}
    measured = {c: v for c, v in levels.items() if isinstance(v, Mapping) and _runs(v)}
    if not measured:
        result.status, result.error = "failed", "the ensemble module recorded no level"
        return result
    first = next(iter(measured))
    targets = _targets(raw)
    goals = {f"{t['name']}_c{first}": t for t in targets}
    for c, level in measured.items():
        try:
            _level(result, c, level, goals, raw.get("settings") or {})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            result.notes.append(f"c={c}: not read to the end ({type(exc).__name__}: {exc})")
    for name, target in goals.items():  # a target with no figure of its name at its level
        better = better_of(target.get("comparison"))
        result.figure(name, target.get("value"), "x", better=better, goal=target["goal"])
    result.notes += [f"target {t['name']}: not measured" for t in targets if t.get("value") is None]
    result.charts.append(_latency_chart(first, measured[first]))
    return result
