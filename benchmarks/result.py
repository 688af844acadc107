"""What one ``loom bench`` run reports, in a shape every benchmark shares: a ``Section`` per
benchmark holding its headline figures, its tables and its charts, all plain data.

The run folder's ``result.json`` is ``{"command", "machine", "figures", "sections", ...}``;
``figures`` is every section's figures in one list (what ``loom bench compare`` reads), each
named ``<section>.<figure>``; ``report.md`` is the tables; each chart becomes one PNG.

    section = Section(name="embeddings")
    section.figure("stack_vs_rayserve_c64", 1.42, "x", better="higher")
    section.tables.append(Table(title="...", columns=("setup", "c", "texts/s"), rows=[...]))
    section.charts.append(Chart(file="embeddings-throughput.png", title="...", x_label="c",
                                y_label="texts/s", series={"stack": [(1, 80.0), (64, 410.0)]}))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Better = Literal["higher", "lower"]
Status = Literal["ok", "failed", "skipped"]
ChartKind = Literal["line", "step", "bar"]


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One headline number. ``name`` is unique in its section; ``better`` orients ratios."""

    name: str
    value: float
    unit: str
    better: Better = "higher"
    goal: str | None = None
    """The goal in words (``">= 1.3"``), shown in the report; None where there is none."""
    met: bool | None = None
    """Whether ``value`` meets the goal; None where there is no goal."""


@dataclass(kw_only=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    note: str | None = None


@dataclass(kw_only=True)
class Chart:
    """One PNG. ``line``/``step``: each series is (x, y) points; ``bar``: each series is one
    value per entry of ``categories`` (grouped bars), ``None`` where it has none."""

    file: str
    title: str
    x_label: str
    y_label: str
    kind: ChartKind = "line"
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    bars: dict[str, list[float | None]] = field(default_factory=dict)
    hlines: dict[str, float] = field(default_factory=dict)
    """Reference levels drawn across the chart (the engine's best, a goal), by label."""
    vlines: dict[str, float] = field(default_factory=dict)
    """Moments marked on the x axis (the load step), by label."""
    log_x: bool = False
    log_y: bool = False


@dataclass(kw_only=True)
class Section:
    """One benchmark's part of a run."""

    name: str
    status: Status = "ok"
    error: str | None = None
    command: list[str] = field(default_factory=list)
    """The module's own command line this section ran, as it would be typed."""
    wall_s: float | None = None
    raw: str | None = None
    """The module's own JSON, relative to the run folder."""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What a reader must know: a baseline that did not start, a figure refused, ..."""

    def figure(
        self,
        name: str,
        value: float | None,
        unit: str,
        *,
        better: Better = "higher",
        goal: float | None = None,
    ) -> Figure | None:
        """Add a figure; a missing or non-finite ``value`` adds nothing and returns None.
        With ``goal``, ``met`` says whether the value reaches it (``>=`` for higher-is-
        better figures, ``<=`` for lower)."""
        if value is None or not math.isfinite(value):
            return None
        met = None
        if goal is not None:
            met = value >= goal if better == "higher" else value <= goal
        text = None if goal is None else f"{'>=' if better == 'higher' else '<='} {goal:g}"
        added = Figure(
            name=f"{self.name}.{name}", value=value, unit=unit, better=better, goal=text, met=met
        )
        if any(existing.name == added.name for existing in self.figures):
            raise ValueError(f"figure {added.name} added twice")
        self.figures.append(added)
        return added


def better_of(comparison: object) -> Better:
    """Which way a module's target points, from its comparison: ``">="`` higher, else lower."""
    return "higher" if comparison == ">=" else "lower"


def rounded(value: float | None, digits: int) -> float | None:
    """``value`` to ``digits`` decimals for a table; None stays None."""
    return None if value is None else round(value, digits)


def ratio(numerator: float | None, divisor: float | None) -> float | None:
    """``numerator / divisor``, None where either is missing or the divisor is not positive."""
    if numerator is None or divisor is None or divisor <= 0:
        return None
    return numerator / divisor


def as_json(value: Any) -> Any:
    """Dataclasses, paths, tuples and non-finite floats as plain JSON values, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_json(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def section_from_json(data: Mapping[str, Any]) -> Section:
    """A ``Section`` back from its JSON (the report and the plots read a finished run)."""
    charts = [
        Chart(
            **{
                **chart,
                "series": {k: [(p[0], p[1]) for p in v] for k, v in chart["series"].items()},
            }
        )
        for chart in data.get("charts", [])
    ]
    tables = [
        Table(
            **{
                **table,
                "columns": tuple(table["columns"]),
                "rows": [tuple(row) for row in table["rows"]],
            }
        )
        for table in data.get("tables", [])
    ]
    figures = [Figure(**figure) for figure in data.get("figures", [])]
    known = {f.name for f in dataclasses.fields(Section)} - {"figures", "tables", "charts"}
    return Section(
        **{k: v for k, v in data.items() if k in known},
        figures=figures,
        tables=tables,
        charts=charts,
    )


def all_figures(sections: Sequence[Section]) -> list[Figure]:
    return [figure for section in sections for figure in section.figures]
