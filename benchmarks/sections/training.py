"""The training benchmark's section, from ``python -m benchmarks.training``'s JSON: samples/s of
the bare single-process loop (the baseline) and of each job by worker count, the jobs' share of
the baseline, the module's overhead targets with their goals, the 2-over-1-worker speed-up,
the bare loop's loss curve and two charts.

    section = section(json.loads(Path("raw/training.json").read_text()))
    [f.name for f in section.figures]   # training.bare_loop_samples_per_s, ...

A run without a bare loop (or without jobs) still reports what it has; the ratios against
the missing side are left out and the notes say so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.result import Chart, Section, Table, better_of, ratio, rounded

TARGET_FIGURES = {
    "1 - job loop samples/s / bare loop samples/s": "job_w1_loop_overhead",
    "1 - job stage samples/s / bare loop samples/s": "job_w1_stage_overhead",
}
"""The module's targets, by their formula, as figure names (their own names are sentences)."""

RUN_LABELS = ("bare loop, before the jobs", "bare loop, after the jobs")
"""The bare loop's runs in the order the module makes them."""


def _add_targets(section: Section, targets: Sequence[Mapping[str, Any]]) -> None:
    """Overheads are shares of the baseline's samples/s lost (0.04 = 4% slower), lower is
    better; one not measured, or a target this section does not know, becomes a note."""
    for target in targets:
        name = TARGET_FIGURES.get(target["formula"])
        if name is None:
            section.notes.append(f"target not reported as a figure: {target['name']}")
            continue
        better = better_of(target["comparison"])
        added = section.figure(name, target["value"], "share", better=better, goal=target["goal"])
        if added is None:
            section.notes.append(f"{name}: not measured ({target['formula']})")


def _samples_table(bare: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> Table:
    baseline = bare.get("samples_per_s")
    table = Table(
        title="Training: samples/s, the bare loop against the job system",
        columns=(
            "run",
            "workers",
            "samples/s (whole)",
            "samples/s (steps)",
            "÷ bare (whole)",
            "÷ bare (steps)",
            "seconds",
            "perplexity",
        ),
        note="whole: the bare loop from building the model to its last step, a job's whole "
        "train stage (workers started, group joined, steps, checkpoints, evaluation, save); "
        "steps: the job's steps alone, timed inside rank 0. The baseline is the mean of the "
        "bare loop's runs.",
    )
    for label, run in zip(RUN_LABELS, bare.get("runs", []), strict=False):
        table.rows.append(
            (
                label,
                1,
                rounded(run["samples_per_s"], 1),
                None,
                None,
                None,
                rounded(run["seconds"], 1),
                None,
            )
        )
    if baseline is not None:
        table.rows.append(
            ("bare loop, mean (baseline)", 1, rounded(baseline, 1), None, 1.0, None, None, None)
        )
    for job in jobs:
        table.rows.append(
            (
                f"job W={job['workers']}",
                job["workers"],
                rounded(job["stage_samples_per_s"], 1),
                rounded(job["loop_samples_per_s"], 1),
                rounded(ratio(job["stage_samples_per_s"], baseline), 3),
                rounded(ratio(job["loop_samples_per_s"], baseline), 3),
                rounded(job["train_stage_s"], 1),
                rounded(job["perplexity"], 1),
            )
        )
    return table


def _stages_table(jobs: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(
        title="Training: seconds in each stage of each job",
        columns=("job", "stage", "seconds"),
        note="a stage lasts from its running event to the next one (or the job's end)",
    )
    for job in jobs:
        for stage, seconds in job.get("stages_s", {}).items():
            table.rows.append((f"job W={job['workers']}", stage, rounded(seconds, 1)))
    return table


def _charts(bare: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> list[Chart]:
    charts = []
    # the runs share seed and data, so on the CPU their curves match: one line, and a second
    # only for a run whose curve differs (a nondeterministic kernel, a changed default)
    curves: dict[str, list[tuple[float, float]]] = {}
    for label, run in zip(RUN_LABELS, bare.get("runs", []), strict=False):
        curve = [(step, loss) for step, loss in run.get("loss") or []]
        if curve and curve not in curves.values():
            curves["bare loop" if not curves else label] = curve
    if curves:
        charts.append(
            Chart(
                file="training-loss.png",
                title="Training: the bare loop's loss by step",
                x_label="step",
                y_label="loss (cross-entropy, nats)",
                series=curves,
            )
        )
    # one group per run: the bare loop (whole run only), then each job (whole stage, steps)
    baseline = bare.get("samples_per_s")
    categories = [f"job W={job['workers']}" for job in jobs]
    whole: list[float | None] = [job["stage_samples_per_s"] for job in jobs]
    steps: list[float | None] = [job["loop_samples_per_s"] for job in jobs]
    if baseline is not None:
        categories, whole, steps = ["bare loop", *categories], [baseline, *whole], [None, *steps]
    if categories:
        charts.append(
            Chart(
                file="training-samples-per-s.png",
                title="Training: samples/s, the bare loop against the job by worker count",
                x_label="run",
                y_label="samples/s",
                kind="bar",
                categories=categories,
                bars={"whole run / train stage": whole, "steps alone": steps},
            )
        )
    return charts


def section(raw: Mapping[str, Any]) -> Section:
    """The ``training`` section: figures ``bare_loop_samples_per_s``,
    ``job_w<W>_stage_samples_per_s`` and ``job_w<W>_loop_samples_per_s``,
    ``job_w<W>_stage_over_bare`` and ``job_w<W>_loop_over_bare`` (x), the module's targets
    ``job_w1_loop_overhead`` and ``job_w1_stage_overhead`` (share, goal <= 0.1),
    ``speedup_2_over_1`` and ``bare_loop_final_loss``."""
    result = Section(name="training", wall_s=raw.get("wall_s"))
    bare: Mapping[str, Any] = raw.get("bare_loop") or {}
    jobs = sorted(raw.get("jobs") or [], key=lambda job: job["workers"])
    baseline = bare.get("samples_per_s")
    if baseline is None:
        result.notes.append("no bare loop measured: the jobs' ratios to it are left out")
    if not jobs:
        result.notes.append("no job ran: only the bare loop is reported")
    result.figure("bare_loop_samples_per_s", baseline, "samples/s")
    for job in jobs:
        w = job["workers"]
        result.figure(f"job_w{w}_stage_samples_per_s", job["stage_samples_per_s"], "samples/s")
        result.figure(f"job_w{w}_loop_samples_per_s", job["loop_samples_per_s"], "samples/s")
        result.figure(f"job_w{w}_stage_over_bare", ratio(job["stage_samples_per_s"], baseline), "x")
        result.figure(f"job_w{w}_loop_over_bare", ratio(job["loop_samples_per_s"], baseline), "x")
    _add_targets(result, raw.get("targets", []))
    result.figure("speedup_2_over_1", raw.get("speedup_2_over_1"), "x")
    curves = [run["loss"] for run in bare.get("runs", []) if run.get("loss")]
    if curves:
        result.figure("bare_loop_final_loss", curves[0][-1][1], "nats", better="lower")
    elif baseline is not None:
        result.notes.append("no loss curve: this run's bare loop did not record its loss")
    if raw.get("same_data") is False:
        result.notes.append("the jobs did not train on the bare loop's tokens (sha256 differs)")
    if raw.get("stage_fixed_s") is not None:
        result.notes.append(
            f"the W=1 train stage's fixed cost: {raw['stage_fixed_s']:.1f} s beyond its steps "
            "(workers started, imports, joining, evaluation, final save)"
        )
    gpu = raw.get("gpu") or {}
    if "skipped" not in gpu and gpu:
        result.figure("gpu_small_bf16_tokens_per_s", gpu.get("tokens_per_s"), "tokens/s")
        result.figure("gpu_small_bf16_mfu", gpu.get("mfu"), "share")
    result.tables.append(_samples_table(bare, jobs))
    if any(job.get("stages_s") for job in jobs):
        result.tables.append(_stages_table(jobs))
    result.charts += _charts(bare, jobs)
    return result
