"""The job runner in this process (no Ray): a stage that raises ends the run in an error
that names the job, in the job's own log and in this process's."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from training.db import create_db_engine, create_tables
from training.jobs import JobStore
from training.runner import JobRunner, RunnerSettings
from training.spec import parse_job_spec
from training.spec_fields import JobSpec
from training.stages import Stage, StageContext
from training.trainers.registry import TRAINERS, Trainer


class BrokenJobSpec(JobSpec):
    trainer: Literal["broken"] = Field(description="The registered trainer to run.")


def explode(context: StageContext[Any]) -> dict[str, Any]:
    raise OSError("disk full")


@pytest.fixture
def broken_trainer() -> Iterator[None]:
    stages = [
        Stage("prepare", "splitter", 0.5, lambda c: {}),
        Stage("explode", "sink", 0.5, explode),
    ]
    TRAINERS.register(Trainer(name="broken", spec=BrokenJobSpec, stages=lambda: stages))
    yield
    TRAINERS.unregister("broken")


@pytest.mark.usefixtures("broken_trainer")
def test_a_stage_that_raises_ends_the_run_with_one_error_line_naming_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RunnerSettings(
        db_url=f"sqlite:///{tmp_path / 'loom.db'}",
        models_dir=str(tmp_path / "models"),
        jobs_dir=str(tmp_path / "jobs"),
    )
    engine = create_db_engine(settings.db_url)
    create_tables(engine)
    store = JobStore(engine)
    job = store.submit(parse_job_spec({"name": "b", "trainer": "broken"}))
    store.start(job.id, stage="starting")

    with caplog.at_level(logging.INFO, logger="training"):
        outcome = JobRunner(settings).run(job.id.value)

    assert (outcome.status, outcome.error) == ("error", "OSError: disk full")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"job {job.id.value} failed in stage explode"]
    assert errors[0].exc_info is not None  # the traceback rides on the one record
    assert store.logs(job.id)[-1].message.startswith("failed: OSError: disk full")
    engine.dispose()
