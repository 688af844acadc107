"""The embeddings benchmark's section: ``python -m benchmarks.embeddings``'s JSON read into
headline ratios against the baselines measured in the same run (Ray Serve alone, the plain
server, the engine in process), a table per part and three charts.

The load generator bounds every figure: the run first drives the no-op server, and a set-up
level that reaches 80% of that ceiling measured the client as much as the server, so no
figure comes from it and a note says so. A set-up that was skipped or failed leaves its
figures out with a note; the rest is reported.

    section = section(json.loads(Path("raw/embeddings.json").read_text()))
    section.figures[0].name      # "embeddings.engine_best_texts_per_s"
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.report import (
    BatchSizes,
    BatchSummary,
    LevelSummary,
    TargetGoals,
    batch_from_json,
    best_batch,
    hop_cost,
    level_at,
    level_from_json,
)
from benchmarks.result import Chart, Section, Table, better_of, ratio, rounded

NEAR_CEILING_SHARE = 0.8
"""A level at or above this share of the no-op server's req/s is refused (the issue's 20%)."""
ENGINE_BATCH = 32
"""The engine batch size the stack's throughput is held against (the best where not swept)."""
BASELINES = ("rayserve", "plain")
PERCENTILES = ("p50", "p95", "p99")


def section(raw: Mapping[str, Any]) -> Section:
    """The section of one ``embeddings.json``; never raises on a part that is missing."""
    out = Section(name="embeddings")
    goals = TargetGoals()
    sweep = [batch_from_json(b) for b in (raw.get("engine") or {}).get("sweep", [])]
    if not sweep:
        out.notes.append("no engine sweep in the raw JSON: no figure against the engine")
    ceiling = loadgen_ceiling(raw, out.notes)
    measured = setup_levels(raw, out.notes)
    usable = {
        name: usable_levels(name, levels, ceiling, out.notes) for name, levels in measured.items()
    }
    refused = {
        (name, level.concurrency)
        for name, levels in measured.items()
        for level in levels
        if level not in usable[name]
    }
    add_figures(out, sweep, usable, goals)
    targets = add_targets(out, raw, refused, goals)
    best = best_batch(sweep)
    out.tables += [
        headline_table(out),
        engine_table(raw, sweep),
        levels_table(raw, measured, refused, rayserve=usable.get("rayserve", []), best=best),
    ]
    out.tables += [t for t in (batch_sizes_table(measured), targets) if t is not None]
    out.charts += [throughput_chart(usable, best), latency_chart(usable)]
    add_open_loop(out, raw)
    if (chart := batch_sizes_chart(measured)) is not None:
        out.charts.append(chart)
    else:
        out.notes.append(
            "no batch-size histogram in the raw JSON (a run from before it was recorded, or "
            "the stack's metrics could not be read): no batch-size chart"
        )
    return out


# ---- reading the raw JSON ---------------------------------------------------------------------


def loadgen_ceiling(raw: Mapping[str, Any], notes: list[str]) -> float | None:
    """The load generator's req/s against the no-op server; None (with a note) where unmeasured."""
    loadgen = raw.get("loadgen") or {}
    levels = [level_from_json(level) for level in loadgen.get("levels", [])]
    if not levels:
        reason = first_line(loadgen.get("error")) or "no no-op levels in the raw JSON"
        notes.append(
            f"the load generator's ceiling was not measured ({reason}): figures are not checked "
            "against it"
        )
        return None
    return max(level.req_per_s for level in levels)


def setup_levels(raw: Mapping[str, Any], notes: list[str]) -> dict[str, list[LevelSummary]]:
    """Every HTTP set-up's levels, by name; a set-up skipped, failed or absent gets a note,
    and no entry where it has no level."""
    records: Mapping[str, Any] = raw.get("setups") or {}
    config: Mapping[str, Any] = raw.get("config") or {}
    for name in ("stack", *BASELINES):
        if name not in records:
            why = f"--skip-{name}" if config.get(f"skip_{name}") else "no record in the raw JSON"
            notes.append(f"{name} not measured ({why}): its figures are left out")
    levels = {}
    for name, record in records.items():
        if record.get("error"):
            notes.append(f"{name} failed: {first_line(record['error'])}")
        if record.get("levels"):
            levels[name] = [level_from_json(level) for level in record["levels"]]
        for level in levels.get(name, []):
            if level.errors:
                notes.append(
                    f"{name} c={level.concurrency}: {level.errors} errors beside "
                    f"{level.requests} answers"
                )
    return levels


def usable_levels(
    setup: str, levels: Sequence[LevelSummary], ceiling: float | None, notes: list[str]
) -> list[LevelSummary]:
    """The levels a figure may come from: those below ``NEAR_CEILING_SHARE`` of the ceiling."""
    kept = []
    for level in levels:
        if is_refused(level, ceiling):
            notes.append(
                f"{setup} c={level.concurrency} refused: {level.req_per_s:.0f} req/s is within "
                f"{1 - NEAR_CEILING_SHARE:.0%} of the load generator's own ceiling ({ceiling:.0f} "
                "req/s against the no-op server), so it measured the client: no figure from it"
            )
        else:
            kept.append(level)
    return kept


def is_refused(level: LevelSummary, ceiling: float | None) -> bool:
    """``level`` reached ``NEAR_CEILING_SHARE`` of the load generator's ceiling: 41,000 req/s
    against a 51,000 req/s no-op ceiling is 0.80 of it, refused."""
    return ceiling is not None and level.req_per_s >= NEAR_CEILING_SHARE * ceiling


def first_line(text: object) -> str:
    return str(text).strip().splitlines()[0] if text else ""


def highest_common(a: Sequence[LevelSummary], b: Sequence[LevelSummary]) -> int | None:
    """The highest concurrency both ``a`` and ``b`` ran; None where they share none."""
    common = {level.concurrency for level in a} & {level.concurrency for level in b}
    return max(common, default=None)


# ---- figures ----------------------------------------------------------------------------------


def add_figures(
    out: Section,
    sweep: Sequence[BatchSummary],
    usable: Mapping[str, Sequence[LevelSummary]],
    goals: TargetGoals,
) -> None:
    best = best_batch(sweep)
    stack = usable.get("stack", [])
    out.figure("engine_best_texts_per_s", best.texts_per_s if best else None, "texts/s")
    top = max(stack, key=lambda level: level.concurrency, default=None)
    if top is None:
        if "stack" in usable:
            out.notes.append("no usable stack level: no stack figure")
    else:
        out.figure(f"stack_rps_c{top.concurrency}", top.req_per_s, "req/s")
        engine = next((b for b in sweep if b.batch_size == ENGINE_BATCH), best)
        if engine is not None and engine.batch_size != ENGINE_BATCH:
            out.notes.append(
                f"the engine did not run batch {ENGINE_BATCH}: the stack is held against its "
                f"best, batch {engine.batch_size}"
            )
        if engine is not None:
            out.figure(
                f"stack_vs_engine_b{engine.batch_size}_c{top.concurrency}",
                ratio(top.texts_per_s, engine.texts_per_s),
                "x",
                goal=goals.min_stack_over_engine,
            )
    for baseline, goal in (
        ("rayserve", goals.min_stack_over_rayserve),
        ("plain", goals.min_stack_over_plain),
    ):
        levels = usable.get(baseline, [])
        at = highest_common(stack, levels)
        if at is None:
            if stack and baseline in usable:
                out.notes.append(f"the stack and {baseline} share no usable level: no ratio")
            continue
        stack_at, baseline_at = level_at(stack, at), level_at(levels, at)
        assert stack_at is not None  # both ran ``at``
        assert baseline_at is not None
        out.figure(
            f"stack_vs_{baseline}_c{at}",
            ratio(stack_at.req_per_s, baseline_at.req_per_s),
            "x",
            goal=goal,
        )
    lo = goals.low_concurrency
    for setup in ("stack", *BASELINES):
        if setup not in usable:
            continue
        added = hop_cost(sweep, usable[setup], goals.high_concurrency, lo).added_p50_ms
        added_figure = out.figure(
            f"{setup}_added_p50_ms_c{lo}",
            added,
            "ms",
            better="lower",
            goal=goals.max_stack_added_p50_ms if setup == "stack" else None,
        )
        if added_figure is None:
            out.notes.append(
                f"no {setup} added p50: it needs a usable {setup} level at c={lo} and the "
                "engine at batch 1"
            )


TARGET_LEVELS = {
    "stack_over_engine": (("stack", "high"),),
    "stack_over_plain": (("stack", "high"), ("plain", "high")),
    "stack_added_p50_ms": (("stack", "low"),),
}
"""Which set-up levels each of the module's targets (``report.evaluate_targets``) reads."""
TARGET_TWINS = {
    "stack_over_engine": "stack_vs_engine_b",
    "stack_over_plain": "stack_vs_plain_c",
    "stack_added_p50_ms": "stack_added_p50_ms_c",
}
"""The section's figure each target usually equals (name prefix): a target of the same value
is not added twice (``stack_over_engine`` differs where the engine's best is not batch 32)."""


def add_targets(
    out: Section,
    raw: Mapping[str, Any],
    refused: set[tuple[str, int]],
    goals: TargetGoals,
) -> Table | None:
    """The module's own targets (``raw["targets"]``) in a table with their verdicts, and as
    figures under their own names where no figure already holds the same value. A target
    that reads a refused level is neither (one this section does not know: where any level
    was refused)."""
    targets = raw.get("targets") or []
    if not targets:
        return None
    table = Table(
        title="The module's own targets (python -m benchmarks.embeddings)",
        columns=("target", "value", "goal", "verdict", "formula"),
    )
    concurrency = {"high": goals.high_concurrency, "low": goals.low_concurrency}
    for target in targets:
        name, value = target["name"], target.get("value")
        reads = TARGET_LEVELS.get(name)
        blocked = (
            bool(refused)
            if reads is None
            else any((setup, concurrency[end]) in refused for setup, end in reads)
        )
        goal = f"{target.get('comparison', '>=')} {target.get('goal')}"
        verdict = "refused" if blocked else target.get("verdict", "")
        table.rows.append((name, rounded(value, 3), goal, verdict, target.get("formula", "")))
        if blocked:
            out.notes.append(f"the module's target {name} refused: it reads a refused level")
            continue
        twin = TARGET_TWINS.get(name)
        if value is not None and any(
            f.name.startswith(f"{out.name}.{twin}") and math.isclose(f.value, value)
            for f in out.figures
            if twin is not None
        ):
            continue
        out.figure(
            name,
            value,
            "ms" if name.endswith("_ms") else "x",
            better=better_of(target.get("comparison", ">=")),
            goal=target.get("goal"),
        )
    return table


# ---- tables -----------------------------------------------------------------------------------


def engine_table(raw: Mapping[str, Any], sweep: Sequence[BatchSummary]) -> Table:
    engine = raw.get("engine") or {}
    return Table(
        title=f"Engine alone, in process ({engine.get('device', '?')}, {engine.get('dtype', '?')})",
        columns=("batch", "texts/s", "p50 ms", "p95 ms", "batches"),
        rows=[
            (
                b.batch_size,
                rounded(b.texts_per_s, 1),
                rounded(b.p50_ms, 2),
                rounded(b.p95_ms, 2),
                b.batches,
            )
            for b in sweep
        ],
    )


def levels_table(
    raw: Mapping[str, Any],
    measured: Mapping[str, Sequence[LevelSummary]],
    refused: set[tuple[str, int]],
    *,
    rayserve: Sequence[LevelSummary],
    best: BatchSummary | None,
) -> Table:
    """Every level of every set-up, the no-op server's first; ratios beside the stacks'."""
    engine_best = (
        "n/a" if best is None else f"{best.texts_per_s:.0f} texts/s at batch {best.batch_size}"
    )
    table = Table(
        title="HTTP set-ups, closed loop, one text per request",
        columns=(
            "setup", "c", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors",
            "x rayserve", "x engine best", "note",
        ),
        note=f"x engine best: texts/s over the engine's best in process ({engine_best}); "
        f"a level at >= {NEAR_CEILING_SHARE:g} x the no-op server's req/s is refused",
    )  # fmt: skip
    noop = [level_from_json(level) for level in (raw.get("loadgen") or {}).get("levels", [])]
    for name, levels in {"noop": noop, **measured}.items():
        for level in levels:
            against = (
                level_at(rayserve, level.concurrency) if name not in ("noop", "rayserve") else None
            )
            note = "load generator ceiling" if name == "noop" else ""
            if (name, level.concurrency) in refused:
                note = "refused: near the load generator's ceiling"
            table.rows.append(
                (
                    name,
                    level.concurrency,
                    rounded(level.req_per_s, 1),
                    rounded(level.p50_ms, 2),
                    rounded(level.p95_ms, 2),
                    rounded(level.p99_ms, 2),
                    level.errors,
                    rounded(ratio(level.req_per_s, against.req_per_s if against else None), 2),
                    None
                    if name == "noop"
                    else rounded(ratio(level.texts_per_s, best.texts_per_s if best else None), 2),
                    note,
                )
            )
    return table


def bucket_label(sizes: BatchSizes, index: int) -> str:
    """``"<= 16"`` for a bounded bucket, ``"> 1024"`` for the last."""
    return f"<= {sizes.le[index]:g}" if index < len(sizes.le) else f"> {sizes.le[-1]:g}"


def batch_sizes_table(measured: Mapping[str, Sequence[LevelSummary]]) -> Table | None:
    rows = []
    for name, levels in measured.items():
        for level in levels:
            sizes = level.batch_sizes
            if sizes is None:
                continue
            runs = sum(sizes.counts)
            spread = ", ".join(
                f"{bucket_label(sizes, i)}: {count}"
                for i, count in enumerate(sizes.counts)
                if count
            )
            rows.append(
                (name, level.concurrency, runs, rounded(ratio(sizes.inputs, runs), 2), spread)
            )
    if not rows:
        return None
    return Table(
        title="Stack batch sizes per level (engine runs in the window, from loom_batch_size)",
        columns=("setup", "c", "engine runs", "mean batch", "runs by batch size"),
        rows=rows,
        note="read from the sidecars as each window opened and after it closed; a replica "
        "rewrites its stats each second, so the runs cover about the window, not exactly",
    )


def headline_table(out: Section) -> Table:
    return Table(
        title="Headline figures",
        columns=("figure", "value", "unit", "goal", "met"),
        rows=[
            (
                f.name,
                rounded(f.value, 3),
                f.unit,
                f.goal or "",
                {True: "yes", False: "NO", None: ""}[f.met],
            )
            for f in out.figures
        ],
    )


# ---- charts -----------------------------------------------------------------------------------


def throughput_chart(
    usable: Mapping[str, Sequence[LevelSummary]], best: BatchSummary | None
) -> Chart:
    return Chart(
        file="embeddings-throughput.png",
        title="Embeddings: throughput against concurrency (refused levels left out)",
        x_label="concurrency (virtual users)",
        y_label="req/s (one text per request)",
        series={
            name: [(float(level.concurrency), level.req_per_s) for level in levels]
            for name, levels in usable.items()
        },
        hlines={} if best is None else {f"engine best (batch {best.batch_size})": best.texts_per_s},
        log_x=True,
    )


def latency_chart(usable: Mapping[str, Sequence[LevelSummary]]) -> Chart:
    series: dict[str, list[tuple[float, float]]] = {}
    for name, levels in usable.items():
        for percentile in PERCENTILES:
            points = [
                (float(level.concurrency), value)
                for level in levels
                if (value := getattr(level, f"{percentile}_ms")) is not None
            ]
            if points:
                series[f"{name} {percentile}"] = points
    return Chart(
        file="embeddings-latency.png",
        title="Embeddings: latency against concurrency",
        x_label="concurrency (virtual users)",
        y_label="latency (ms)",
        series=series,
        log_x=True,
        log_y=True,
    )


def batch_sizes_chart(measured: Mapping[str, Sequence[LevelSummary]]) -> Chart | None:
    """One bar group per stack level: the share of its engine runs in each batch-size bucket,
    buckets up to the largest any level filled."""
    histograms: dict[str, BatchSizes] = {}
    for name, levels in measured.items():
        for level in levels:
            if level.batch_sizes is not None and any(level.batch_sizes.counts):
                histograms[f"{name} c={level.concurrency}"] = level.batch_sizes
    if not histograms:
        return None
    first = next(iter(histograms.values()))
    filled = max(max(i for i, c in enumerate(s.counts) if c) for s in histograms.values())
    return Chart(
        file="embeddings-batch-sizes.png",
        title="Stack: engine runs by batch size, per concurrency level",
        x_label="batch size (texts per engine run)",
        y_label="engine runs (% of the level's)",
        kind="bar",
        categories=[bucket_label(first, i) for i in range(filled + 1)],
        bars={
            label: [100.0 * count / sum(sizes.counts) for count in sizes.counts[: filled + 1]]
            for label, sizes in histograms.items()
        },
    )


# ---- open loop --------------------------------------------------------------------------------


def open_levels(raw: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Each set-up's open-loop levels (Poisson arrivals at shares of its own closed-loop
    best), where it has any."""
    setups = raw.get("setups") or {}
    return {
        name: list(record.get("open_levels") or [])
        for name, record in setups.items()
        if isinstance(record, Mapping) and record.get("open_levels")
    }


def add_open_loop(out: Section, raw: Mapping[str, Any]) -> None:
    """A table and a chart of latency against offered load; the stack's p99 at its highest
    share as a figure (the latency its users see near capacity, queueing included)."""
    levels = open_levels(raw)
    if not levels:
        return
    rows = [
        (
            name,
            f"{level.get('share', 0):.0%}",
            rounded(level.get("offered_rate_per_s"), 1),
            rounded(level.get("achieved_rate_per_s"), 1),
            *(rounded(level.get(f"{p}_ms"), 1) for p in PERCENTILES),
            level.get("errors"),
        )
        for name, records in levels.items()
        for level in records
    ]
    out.tables.append(
        Table(
            title="Open loop: Poisson arrivals at shares of each set-up's closed-loop best",
            columns=("set-up", "share", "offered req/s", "achieved req/s")
            + tuple(f"{p} ms" for p in PERCENTILES)
            + ("errors",),
            rows=rows,
            note="latency from each request's scheduled arrival: waiting for a connection "
            "counts, as it would for independent clients",
        )
    )
    out.charts.append(
        Chart(
            file="embeddings-open-loop.png",
            title="p99 latency against offered load (open loop)",
            x_label="offered req/s",
            y_label="p99 ms",
            series={
                name: [
                    (float(level["offered_rate_per_s"]), float(level["p99_ms"]))
                    for level in records
                    if level.get("p99_ms") is not None and level.get("offered_rate_per_s")
                ]
                for name, records in levels.items()
            },
            log_y=True,
        )
    )
    stack = levels.get("stack") or []
    highest = max(stack, key=lambda level: level.get("share", 0), default=None)
    if highest is not None and highest.get("p99_ms") is not None:
        share = round(100 * float(highest.get("share", 0)))
        out.figure(
            f"stack_open_p99_ms_at_{share}pct", float(highest["p99_ms"]), "ms", better="lower"
        )
