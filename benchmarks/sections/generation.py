"""The generation benchmark's section, from ``python -m benchmarks.generation``'s JSON: tokens/s
of each variant (sequential ``model.generate``, static batching, transformers' continuous
batching in-process, the Loom stack) at its highest concurrency, the module's targets with
their goals, the stack's TTFT with one client, a table of every level and two charts.

    section = section(json.loads(Path("raw/generation.json").read_text()))
    [f.name for f in section.figures]   # generation.stack_c32_tokens_per_s, ...

A variant that failed (its ``error``) is named in the notes; the levels it measured before
failing, and every other variant, are still reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.result import Chart, Section, Table, better_of, ratio, rounded

VARIANT_LABELS = {
    "sequential": "sequential generate",
    "static": "static batching",
    "cb": "transformers CB in-process",
    "stack": "Loom stack",
}
"""Every variant the module runs, in its order, with the label its table rows and chart lines
carry."""

Level = Mapping[str, Any]


def _levels(raw: Mapping[str, Any]) -> dict[str, list[Level]]:
    """Each variant's levels, lowest concurrency first, in the module's variant order."""
    variants = raw.get("variants", {})
    return {
        name: sorted(variants[name].get("levels", []), key=lambda level: level["concurrency"])
        for name in VARIANT_LABELS
        if name in variants
    }


def _at(levels: Sequence[Level], concurrency: int) -> Level | None:
    return next((level for level in levels if level["concurrency"] == concurrency), None)


def _add_targets(section: Section, targets: Sequence[Mapping[str, Any]]) -> None:
    """The module's targets (all ratios) as figures with their goals; one not measured (a level
    or a variant missing) as a note with its formula."""
    for target in targets:
        better = better_of(target["comparison"])
        added = section.figure(
            target["name"], target["value"], "x", better=better, goal=target["goal"]
        )
        if added is None:
            section.notes.append(f"{target['name']}: not measured ({target['formula']})")


def _add_stack_over_static(section: Section, levels: Mapping[str, Sequence[Level]]) -> None:
    """Stack tokens/s / static batching's, at the highest concurrency both ran: 1 and 8 for
    both -> c=8; 900 tokens/s over 450 -> 2.0 x."""
    stack = {lv["concurrency"]: lv["tokens_per_s"] for lv in levels.get("stack", [])}
    static = {lv["concurrency"]: lv["tokens_per_s"] for lv in levels.get("static", [])}
    common = stack.keys() & static.keys()
    if common:
        c = max(common)
        section.figure("stack_over_static", ratio(stack[c], static[c]), "x")


def _add_logprobs(section: Section, record: Mapping[str, Any] | None) -> None:
    """The logprobs variant: tokens/s with ``logprobs`` on every fourth request over without,
    the same server, windows in turns (goal >= 0.9)."""
    if not record or record.get("error"):
        return
    c = record["concurrency"]
    section.figure(f"logprobs_c{c}_plain_tokens_per_s", record["plain_tokens_per_s"], "tokens/s")
    section.figure(f"logprobs_c{c}_mixed_tokens_per_s", record["mixed_tokens_per_s"], "tokens/s")
    section.figure("logprobs_share", record["logprobs_share"], "x", goal=record.get("goal", 0.9))


def _table(raw: Mapping[str, Any], levels: Mapping[str, Sequence[Level]]) -> Table:
    model, lengths = raw.get("model", {}), raw.get("output_lengths", {})
    note = [
        f"random GPT-2, {model.get('parameters', 0) / 1e6:.1f} M parameters, prompts "
        f"{model.get('prompt_tokens_min')}-{model.get('prompt_tokens_max')} tokens, new tokens "
        f"{lengths.get('max_tokens_min')}-{lengths.get('max_tokens_max')} "
        f"({lengths.get('distribution')}), greedy, EOS ignored"
    ]
    shares = raw.get("variants", {}).get("static", {}).get("useful_token_share", {})
    if shares:
        # (40 + 88) / (2 x 88) = 0.73: a short member's row idles until the longest ends
        listed = ", ".join(f"c={c} {share:.2f}" for c, share in shares.items())
        note.append(f"static batching's useful share of computed tokens: {listed}")
    table = Table(
        title="Generation: tokens/s and time to first token by concurrency",
        columns=(
            "variant",
            "c",
            "tokens/s",
            "TTFT p50 ms",
            "TTFT p95 ms",
            "requests",
            "errors",
            "short",
            "window s",
        ),
        note="; ".join(note),
    )
    for name, variant_levels in levels.items():
        for level in variant_levels:
            table.rows.append(
                (
                    VARIANT_LABELS[name],
                    level["concurrency"],
                    rounded(level["tokens_per_s"], 1),
                    rounded(level["ttft_p50_ms"], 1),
                    rounded(level["ttft_p95_ms"], 1),
                    level["requests"],
                    level.get("errors", 0),
                    level.get("short", 0),
                    rounded(level["duration_s"], 1),
                )
            )
    return table


def _charts(levels: Mapping[str, Sequence[Level]]) -> list[Chart]:
    tokens = {
        VARIANT_LABELS[name]: [(lv["concurrency"], lv["tokens_per_s"]) for lv in variant_levels]
        for name, variant_levels in levels.items()
        if variant_levels
    }
    ttft = {
        VARIANT_LABELS[name]: [
            (lv["concurrency"], lv["ttft_p50_ms"])
            for lv in variant_levels
            if lv["ttft_p50_ms"] is not None
        ]
        for name, variant_levels in levels.items()
    }
    charts = []
    if tokens:
        charts.append(
            Chart(
                file="generation-tokens-per-s.png",
                title="Generation: tokens/s by concurrency",
                x_label="concurrency (closed-loop clients)",
                y_label="tokens/s",
                series=tokens,
                log_x=True,
            )
        )
    ttft = {label: points for label, points in ttft.items() if points}
    if ttft:
        # sequential's TTFT grows with the queue (c=8: ~7 requests ahead), the stack's should
        # not: a log scale keeps both readable
        charts.append(
            Chart(
                file="generation-ttft.png",
                title="Generation: time to first token (p50) by concurrency",
                x_label="concurrency (closed-loop clients)",
                y_label="TTFT p50 (ms)",
                series=ttft,
                log_x=True,
                log_y=True,
            )
        )
    return charts


def section(raw: Mapping[str, Any]) -> Section:
    """The ``generation`` section: figures ``<variant>_c<c>_tokens_per_s`` (each variant at its
    highest concurrency), the module's targets (``stack_over_sequential``,
    ``stack_ttft_growth``, ``stack_share_of_cb``, with goals), ``stack_over_static`` and
    ``stack_c1_ttft_p50_ms``."""
    result = Section(name="generation", wall_s=raw.get("wall_s"))
    levels = _levels(raw)
    for name, record in raw.get("variants", {}).items():
        if record.get("error"):
            kept = len(record.get("levels", []))
            result.notes.append(
                f"{name}: failed: {record['error']} ({kept} level(s) measured before it)"
            )
    for name, variant_levels in levels.items():
        if variant_levels:
            top = variant_levels[-1]
            result.figure(
                f"{name}_c{top['concurrency']}_tokens_per_s", top["tokens_per_s"], "tokens/s"
            )
        for level in variant_levels:
            if level.get("errors") or level.get("short"):
                result.notes.append(
                    f"{name} c={level['concurrency']}: {level.get('errors', 0)} errors, "
                    f"{level.get('short', 0)} short answers in the window"
                )
    _add_targets(result, raw.get("targets", []))
    _add_stack_over_static(result, levels)
    _add_logprobs(result, raw.get("variants", {}).get("logprobs"))
    stack_c1 = _at(levels.get("stack", []), 1)
    if stack_c1 is not None:
        result.figure("stack_c1_ttft_p50_ms", stack_c1["ttft_p50_ms"], "ms", better="lower")
    if not raw.get("variants"):
        result.notes.append("no variant was run: the benchmark ended before measuring")
    result.tables.append(_table(raw, levels))
    result.charts += _charts(levels)
    return result
