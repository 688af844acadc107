"""Two benchmark runs side by side: each figure's ratio, oriented so that above 1 is better,
the differences between the machines and versions that ran them, and a verdict a CI job can
gate on (issue 16, point 4; ``loom bench compare`` is to call this).

A run's ``result.json`` lists its headline figures, each with a unit and which way is better:

    {"figures": [{"name": "stack_rps_c64", "value": 212.0, "unit": "req/s",
                  "better": "higher"}, ...],
     "machine": {"cpu_model": ..., "versions": {"torch": ...}, "git_commit": ..., ...}}

    comparison = compare(load_run(Path("runs/a")), load_run(Path("runs/b")))
    print(format_comparison(comparison))
    comparison.worst_ratio < 0.9      # a regression past 10 %: fail the job
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RESULT_FILE = "result.json"


class RunError(ValueError):
    """A run's result cannot be read as one; the message names the file and the fault."""


@dataclass(frozen=True, kw_only=True)
class Figure:
    name: str
    value: float
    unit: str
    better: Literal["higher", "lower"]


@dataclass(frozen=True, kw_only=True)
class Run:
    """What ``compare`` reads of one run: its figures by name and its machine facts."""

    label: str
    figures: dict[str, Figure]
    machine: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Row:
    name: str
    unit: str
    a: float | None
    b: float | None

    better: Literal["higher", "lower"]

    @property
    def ratio(self) -> float | None:
        """B against A, above 1 when B is better: b / a for higher-is-better figures, a / b
        for lower-is-better ones (latency 10 ms -> 8 ms: 1.25). None when either is missing
        or the divisor is 0."""
        if self.a is None or self.b is None:
            return None
        numerator, divisor = (self.b, self.a) if self.better == "higher" else (self.a, self.b)
        return None if divisor == 0 else numerator / divisor


@dataclass(frozen=True, kw_only=True)
class Comparison:
    a: str
    b: str
    rows: tuple[Row, ...]
    differences: tuple[tuple[str, str, str], ...]
    """(fact, A's value, B's value) for every machine fact that differs."""

    @property
    def worst_ratio(self) -> float | None:
        ratios = [row.ratio for row in self.rows if row.ratio is not None]
        return min(ratios) if ratios else None

    def below(self, threshold: float) -> list[Row]:
        """The figures whose ratio is under ``threshold`` (a figure only one run has is not
        counted: it cannot regress)."""
        return [row for row in self.rows if row.ratio is not None and row.ratio < threshold]


def _figure(entry: object, where: str) -> Figure:
    if not isinstance(entry, Mapping):
        raise RunError(f"{where}: a figure is an object")
    better = entry.get("better", "higher")
    if better not in ("higher", "lower"):
        raise RunError(f"{where}: better is higher or lower, not {better!r}")
    try:
        name, value = str(entry["name"]), float(entry["value"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{where}: a figure needs a name and a numeric value ({exc})") from None
    return Figure(name=name, value=value, unit=str(entry.get("unit", "")), better=better)


def read_run(data: object, label: str) -> Run:
    """A run from its parsed ``result.json``; ``RunError`` naming ``label`` otherwise."""
    if not isinstance(data, Mapping) or not isinstance(data.get("figures"), list):
        raise RunError(f"{label}: not a benchmark result (no figures list)")
    figures: dict[str, Figure] = {}
    for index, entry in enumerate(data["figures"]):
        figure = _figure(entry, f"{label}: figures.{index}")
        if figure.name in figures:
            raise RunError(f"{label}: figure {figure.name} appears twice")
        figures[figure.name] = figure
    machine = data.get("machine")
    return Run(label=label, figures=figures, machine=dict(machine or {}))


def load_run(path: Path) -> Run:
    """A run from its folder (its ``result.json``) or the file itself."""
    file = path / RESULT_FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunError(f"{file}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{file}: not JSON ({exc.msg}, line {exc.lineno})") from None
    return read_run(data, str(path))


def _flatten(facts: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in facts.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", "-" if value is None else str(value)


MOMENTARY = frozenset({"date_utc", "load_avg_1m", "load_avg_1m_end", "hostname"})
"""Facts that differ between any two runs and say nothing about what was measured."""


def compare(a: Run, b: Run) -> Comparison:
    """Every figure either run has (A's order, then B's new ones), and the machine facts that
    differ (the momentary ones left out)."""
    names = list(a.figures) + [name for name in b.figures if name not in a.figures]
    rows = []
    for name in names:
        fa, fb = a.figures.get(name), b.figures.get(name)
        known = fa or fb
        assert known is not None
        rows.append(
            Row(
                name=name,
                unit=known.unit,
                a=None if fa is None else fa.value,
                b=None if fb is None else fb.value,
                better=known.better,
            )
        )
    facts_a, facts_b = dict(_flatten(a.machine)), dict(_flatten(b.machine))
    differences = tuple(
        (fact, facts_a.get(fact, "-"), facts_b.get(fact, "-"))
        for fact in sorted(set(facts_a) | set(facts_b))
        if fact.split(".")[0] not in MOMENTARY and facts_a.get(fact) != facts_b.get(fact)
    )
    return Comparison(a=a.label, b=b.label, rows=tuple(rows), differences=differences)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_comparison(comparison: Comparison) -> str:
    """A table of the figures (A, B, B vs A) and the differences between the runs."""
    header = ("figure", "unit", "A", "B", "B vs A")
    lines = [
        (
            row.name,
            row.unit,
            _number(row.a),
            _number(row.b),
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
        )
        for row in comparison.rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    table = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in (header, *lines)
    ]
    out = [f"A: {comparison.a}", f"B: {comparison.b}", "", *[line.rstrip() for line in table]]
    if comparison.differences:
        out += ["", "differences between the runs:"]
        out += [f"  {fact}: {va} -> {vb}" for fact, va, vb in comparison.differences]
    return "\n".join(out) + "\n"
