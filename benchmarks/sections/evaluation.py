"""The evaluation benchmark's section, from ``python -m benchmarks.evaluation``'s JSON:
lm-evaluation-harness on the repository's multiple-choice task, ``local-completions`` against
Loom vs lm-eval's in-process ``hf`` model: median wall and evaluation times, Loom's over hf's
(lower is better) and each side's accuracy (they must be equal).

    section = section(json.loads(Path("raw/evaluation.json").read_text()))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.result import Section, Table, rounded


def section(raw: Mapping[str, Any]) -> Section:
    result = Section(name="evaluation", wall_s=raw.get("wall_s"))
    if raw.get("error"):
        result.notes.append(f"failed: {raw['error']}")
    figures = raw.get("figures") or {}
    for side in ("loom", "hf"):
        result.figure(f"{side}_wall_s", figures.get(f"{side}_wall_s"), "s", better="lower")
        result.figure(f"{side}_accuracy", figures.get(f"{side}_accuracy"), "acc")
    for key in ("wall_s", "evaluation_s"):
        result.figure(f"loom_over_hf_{key}", figures.get(f"loom_over_hf_{key}"), "x",
                      better="lower")  # fmt: skip
    if figures and not figures.get("accuracy_equal"):
        result.notes.append("the two sides' accuracies differ: their loglikelihoods disagree")
    table = Table(
        title=f"lm-eval on {raw.get('task', 'the task')}: Loom (local-completions) vs hf",
        columns=("side", "run", "wall s", "evaluating s", "acc"),
        note="wall: lm-eval's whole run; evaluating: from building the model to the results",
    )
    for side, runs in (raw.get("runs") or {}).items():
        for i, run in enumerate(runs):
            table.rows.append(
                (side, i, rounded(run["wall_s"], 1), rounded(run["evaluation_s"], 1),
                 rounded(run["accuracy"], 3))
            )  # fmt: skip
    result.tables.append(table)
    return result
