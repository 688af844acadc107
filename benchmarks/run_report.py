"""A run folder's ``result.json``, ``report.md`` and PNG plots, from its sections.

    result = build_result(sections, command=argv, machine=facts, started_utc=..., wall_s=...)
    write_run(run_dir, result, sections)    # result.json, report.md, *.png

``result.json`` is what ``loom bench compare`` reads: ``figures`` (every section's, each
``<section>.<name>`` with its unit, which way is better, its goal and whether it met it),
``machine`` (CPU, GPU, versions, git commit and dirty flag), ``command`` and ``sections``
(tables, charts, notes; ``loom bench report`` redraws from them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.compare import RESULT_FILE
from benchmarks.result import Figure, Section, Table, all_figures, as_json

logger = logging.getLogger("benchmarks")

REPORT_FILE = "report.md"


def build_result(
    sections: Sequence[Section],
    *,
    command: Sequence[str],
    machine: Mapping[str, Any],
    started_utc: str,
    wall_s: float,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "command": list(command),
        "started_utc": started_utc,
        "wall_s": round(wall_s, 1),
        "options": dict(options),
        "machine": dict(machine),
        "figures": as_json(all_figures(sections)),
        "sections": as_json(list(sections)),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> list[str]:
    lines = [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    return [*lines, ""]


def _goal(figure: Figure) -> str:
    if figure.goal is None:
        return "–"
    return f"{figure.goal} {'✅' if figure.met else '❌'}"


def _machine_lines(machine: Mapping[str, Any]) -> list[str]:
    versions = machine.get("versions") or {}
    gpu = machine.get("gpu")
    gpu_text = "none"
    if gpu:
        gpu_text = (
            f"{gpu.get('count')} × {', '.join(sorted(set(gpu.get('names', []))))}, "
            f"driver {gpu.get('driver')}, CUDA {gpu.get('cuda')}"
        )
    commit = machine.get("git_commit") or "?"
    dirty = " (uncommitted changes)" if machine.get("git_dirty") else ""
    return [
        f"- CPU: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores "
        f"({machine.get('cpus_usable')} usable), load {_cell(machine.get('load_avg_1m'))} at the "
        "start",
        f"- GPU: {gpu_text}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- commit: {commit[:12]}{dirty}; {machine.get('date_utc')}",
    ]


def markdown(result: Mapping[str, Any], sections: Sequence[Section], plots: Sequence[str]) -> str:
    """The report: the command and machine, every figure with its goal, then each section's
    status, notes, tables and plots."""
    lines = [
        "# loom bench",
        "",
        "```",
        " ".join(result["command"]),
        "```",
        "",
        f"Started {result['started_utc']}, {result['wall_s']:.0f} s.",
        "",
        *_machine_lines(result.get("machine", {})),
        "",
        "## Figures",
        "",
        "Ratios are against baselines measured in the same run on the same machine.",
        "",
        "| figure | value | unit | goal |",
        "|---|---|---|---|",
    ]
    for section in sections:
        lines += [
            f"| {f.name} | {_cell(f.value)} | {f.unit} | {_goal(f)} |" for f in section.figures
        ]
    lines.append("")
    drawn = set(plots)
    for section in sections:
        lines += [f"## {section.name}", ""]
        status = section.status + (f" in {section.wall_s:.0f} s" if section.wall_s else "")
        lines += [f"Status: **{status}**", ""]
        if section.command:
            lines += ["```", " ".join(section.command), "```", ""]
        if section.error:
            lines += ["```", section.error, "```", ""]
        lines += [f"- {note}" for note in section.notes]
        if section.notes:
            lines.append("")
        for table in section.tables:
            lines += markdown_table(table)
        for chart in section.charts:
            if chart.file in drawn:
                lines += [f"![{chart.title}]({chart.file})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_run(run_dir: Path, result: dict[str, Any], sections: Sequence[Section]) -> list[str]:
    """``result.json``, the PNGs (where matplotlib is here; the reason in ``plots_error``
    otherwise) and ``report.md``; the PNG files drawn."""
    from benchmarks.plots import PlotsUnavailable, draw_charts

    run_dir.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    result.pop("plots_error", None)
    try:
        plots = draw_charts(sections, run_dir)
    except PlotsUnavailable as exc:
        result["plots_error"] = str(exc)
    result["plots"] = plots
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (run_dir / REPORT_FILE).write_text(markdown(result, sections, plots), encoding="utf-8")
    return plots
