"""The event-driven pipeline (Burns ch. 12): a trainer is a short list of stages, run in order.

Each stage has a role from the book (splitter, sharder, merger, filter, ...) and a function
that reads what earlier stages left and returns its own output, a small JSON-able dict:

    stages = [
        Stage("split", role="sharder", weight=0.05, run=split_corpus),
        Stage("tokenise", role="work queue", weight=0.15, run=tokenise_shards),
        ...
    ]
    outputs = run_stages(stages, context)

A finished stage's output is written to the job's workspace (``stages/<name>.json``) before
the next stage begins; a run that starts again (a retry, or a restart of the scheduler) skips
every stage with an output on disk and goes on from the first without. A stage that is
interrupted mid-way runs again from its start, so each stage is idempotent: its files are
written whole and renamed, its queue items carry idempotency keys, and registration looks
for the version it may already have made.

A filter stage refuses the job by raising ``StageRejected`` with the reason (perplexity above
the threshold, no member good enough): the job fails with that reason and is not retried.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from training.spec_fields import JobSpec
from training.workspace import JobWorkspace, atomic_path

logger = logging.getLogger(__name__)

SpecT = TypeVar("SpecT", bound=JobSpec)
"""The job spec class a pipeline's stages read (``LmJobSpec`` for the lm pipeline)."""

StageRole = Literal[
    "splitter", "sharder", "work queue", "merger", "coordinated batch", "filter", "join", "sink"
]


class StageRejected(Exception):
    """A filter stage refused the job's result; ``reason`` is the job's error. Not retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobStopped(Exception):
    """The job was cancelled while a stage ran; the stage gave up at its next check."""


@dataclass(kw_only=True)
class StageContext(Generic[SpecT]):
    """What a stage may use. Everything with I/O comes in here, so a test can hand in fakes."""

    job_id: str
    spec: SpecT
    """The job's typed spec (its trainer's ``JobSpec`` subclass: ``LmJobSpec``, ...)."""
    workspace: JobWorkspace
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Earlier stages' outputs by stage name."""
    log: Callable[[str], None] = logger.info
    """A line for the job's log (the runner writes it to the job store)."""
    progress: Callable[[float], None] = lambda fraction: None
    """The current stage's progress, 0..1 (the runner scales it to the whole job)."""
    progress_span: tuple[float, float] = (0.0, 1.0)
    """The job's progress at the current stage's start and end: a stage whose work runs in
    other processes (the train workers) scales its own reports with it."""
    should_stop: Callable[[], bool] = lambda: False
    services: Mapping[str, Any] = field(default_factory=dict)
    """The runner's handles a stage needs: ``jobs`` (JobStore), ``queue`` (WorkQueue),
    ``models`` (ModelStore), ``workers`` (how to start queue and train workers)."""

    def check_stop(self) -> None:
        if self.should_stop():
            raise JobStopped(f"job {self.job_id} was cancelled")


@dataclass(frozen=True)
class Stage(Generic[SpecT]):
    name: str
    role: StageRole
    weight: float
    """This stage's share of the job's progress; a pipeline's weights add up to 1."""
    run: Callable[[StageContext[SpecT]], dict[str, Any]]


def stage_output_path(workspace: JobWorkspace, name: str) -> Path:
    return workspace.path / "stages" / f"{name}.json"


def completed_output(workspace: JobWorkspace, name: str) -> dict[str, Any] | None:
    path = stage_output_path(workspace, name)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def run_stages(
    stages: Sequence[Stage[SpecT]],
    context: StageContext[SpecT],
    *,
    on_stage: Callable[[Stage[SpecT]], None] = lambda stage: None,
    on_progress: Callable[[float], None] = lambda fraction: None,
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` in order, skipping those already done; every stage's output by name.

    ``on_stage`` is told as each stage begins (the runner records it as the job's stage);
    ``on_progress`` gets the job's overall progress, 0..1. Raises what a stage raises:
    ``StageRejected`` from a filter, ``JobStopped`` after a cancel, anything else on failure.
    """
    total = sum(stage.weight for stage in stages) or 1.0
    done_weight = 0.0
    for stage in stages:
        context.check_stop()
        existing = completed_output(context.workspace, stage.name)
        if existing is not None:
            context.outputs[stage.name] = existing
            done_weight += stage.weight
            context.log(f"stage {stage.name}: done in an earlier run, skipped")
            continue
        on_stage(stage)
        base = done_weight

        def report(fraction: float, *, _base: float = base, _weight: float = stage.weight) -> None:
            on_progress(min(1.0, (_base + _weight * max(0.0, min(1.0, fraction))) / total))

        context.progress = report
        context.progress_span = (base / total, (base + stage.weight) / total)
        output = stage.run(context)
        with atomic_path(stage_output_path(context.workspace, stage.name)) as temp:
            temp.write_text(json.dumps(output, sort_keys=True))
        context.outputs[stage.name] = output
        done_weight += stage.weight
        on_progress(min(1.0, done_weight / total))
    return context.outputs
