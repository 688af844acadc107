"""A run's charts as PNG files, drawn with matplotlib's Agg backend (no screen needed).

Each ``result.Chart`` becomes one file in the run folder: lines (throughput against
concurrency, one line per set-up), steps (replicas over time) or grouped bars (a batch-size
histogram per concurrency level), with reference levels (``hlines``: the engine's best, a
goal) and marked moments (``vlines``: the load step).

    written = draw_charts(sections, run_dir)     # ["embeddings-throughput.png", ...]

A machine without matplotlib (a bare GPU node) gets no PNGs and one ``PlotsUnavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.result import Chart, Section

logger = logging.getLogger("benchmarks")

_STYLES = ("-o", "-s", "-^", "-D", "-v", "-x", "-P", "-*")


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported here; the message says how to get it."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailable(
            f"no PNG plots: matplotlib is not installed here ({exc}); "
            "`pip install matplotlib` and run `loom bench report RUN_DIR` to draw them"
        ) from None
    return plt


def draw_chart(chart: Chart, path: Path) -> None:
    """One chart to ``path``. Raises ``PlotsUnavailable`` without matplotlib."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    try:
        if chart.kind == "bar":
            _bars(axes, chart)
        else:
            for index, (label, points) in enumerate(chart.series.items()):
                if not points:
                    continue
                xs, ys = zip(*sorted(points), strict=True)
                if chart.kind == "step":
                    axes.step(xs, ys, where="post", label=label)
                else:
                    axes.plot(xs, ys, _STYLES[index % len(_STYLES)], label=label, markersize=4)
        for index, (label, level) in enumerate(chart.hlines.items()):
            axes.axhline(level, linestyle="--", linewidth=1, color=f"C{7 + index % 3}", label=label)
        for label, at in chart.vlines.items():
            axes.axvline(at, linestyle=":", linewidth=1, color="grey", label=label)
        if chart.log_x:
            axes.set_xscale("log", base=2)
        if chart.log_y:
            axes.set_yscale("log")
        axes.set_title(chart.title, fontsize=10)
        axes.set_xlabel(chart.x_label)
        axes.set_ylabel(chart.y_label)
        axes.grid(True, alpha=0.3)
        if chart.series or chart.bars or chart.hlines or chart.vlines:
            axes.legend(fontsize=8)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)


def _bars(axes: Any, chart: Chart) -> None:
    groups = len(chart.bars) or 1
    width = 0.8 / groups
    positions = range(len(chart.categories))
    for index, (label, values) in enumerate(chart.bars.items()):
        offset = (index - (groups - 1) / 2) * width
        axes.bar(
            [p + offset for p in positions],
            [0.0 if v is None else v for v in values],
            width=width,
            label=label,
        )
    axes.set_xticks(list(positions))
    axes.set_xticklabels(chart.categories, fontsize=8)


def draw_charts(sections: Sequence[Section], run_dir: Path) -> list[str]:
    """Every section's charts into ``run_dir``; the file names written. A chart that fails to
    draw is logged and left out (the report says which); ``PlotsUnavailable`` without
    matplotlib."""
    _pyplot()
    written = []
    for section in sections:
        for chart in section.charts:
            try:
                draw_chart(chart, run_dir / chart.file)
            except (ValueError, TypeError) as exc:
                logger.warning("chart %s not drawn: %s", chart.file, exc)
                continue
            written.append(chart.file)
    return written
