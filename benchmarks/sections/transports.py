"""The transports benchmark's section, from ``python -m benchmarks.transports``'s JSON: v2
infer of the ``digits`` classifier with JSON, HTTP's binary tensor extension and gRPC at each
row count, rows/s and p50, the ratios over JSON, and the goal (binary >= 3x JSON rows/s at the
largest size).

    section = section(json.loads(Path("raw/transports.json").read_text()))
    [f.name for f in section.figures]   # transports.binary_over_json_rows256, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.result import Chart, Section, Table, rounded

LABELS = {"json": "JSON", "binary": "HTTP binary", "grpc": "gRPC"}


def section(raw: Mapping[str, Any]) -> Section:
    """Figures ``<transport>_rows<n>_rows_per_s`` and ``<transport>_over_json_rows<n>``; the
    goal's ratio carries its goal."""
    result = Section(name="transports", wall_s=raw.get("wall_s"))
    if raw.get("error"):
        result.notes.append(f"failed: {raw['error']}")
    levels = raw.get("levels", [])
    goal = raw.get("ratios", {}).get("goal", {})
    for level in levels:
        result.figure(
            f"{level['transport']}_rows{level['rows']}_rows_per_s", level["rows_per_s"], "rows/s"
        )
        if level.get("errors"):
            result.notes.append(
                f"{level['transport']} rows={level['rows']}: {level['errors']} errors "
                f"{level.get('error_kinds')}"
            )
    for name, value in raw.get("ratios", {}).items():
        if name == "goal" or value is None:
            continue
        result.figure(name, value, "x", goal=goal.get("goal") if name == goal.get("name") else None)
    table = Table(
        title="v2 infer transports: digits classifier, closed loop",
        columns=("transport", "rows", "c", "req/s", "rows/s", "p50 ms", "p95 ms", "errors"),
        note="bodies encoded once before the run; the figure is the server's cost of each",
    )
    for level in levels:
        table.rows.append(
            (
                LABELS.get(level["transport"], level["transport"]),
                level["rows"],
                level["concurrency"],
                rounded(level["requests_per_s"], 1),
                rounded(level["rows_per_s"], 1),
                rounded(level["p50_ms"], 2),
                rounded(level["p95_ms"], 2),
                level["errors"],
            )
        )
    result.tables.append(table)
    series: dict[str, list[tuple[float, float]]] = {}
    for level in levels:
        label = LABELS.get(level["transport"], level["transport"])
        series.setdefault(label, []).append((level["rows"], level["rows_per_s"]))
    if series:
        result.charts.append(
            Chart(
                file="transports-rows-per-s.png",
                title="v2 infer: rows/s by rows a request",
                x_label="rows a request",
                y_label="rows/s",
                series=series,
                log_x=True,
                log_y=True,
            )
        )
    return result
