"""Training jobs on one local Ray: the scheduler actor runs the lm pipeline end to end, and
the job system survives what it must: a train worker killed and the scheduler itself restarted
(one job, both), and a cancel mid-train. Small data throughout (a ~0.3 MB slice of the
stdlib, a 2-layer GPT-2).

Each kill lands at a step the train worker itself reports it is held at (a debug hold,
``training.holds``; the runners here honour them), never after a wait: a tiny model trains 60
steps in well under a second on a quiet machine, and a kill timed from outside came after
the last step.
The digits pipeline runs end to end through `loom serve` (tests/e2e/test_training_e2e.py)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from models.engines import build_engine
from models.engines.sampling import SamplingParams
from models.store import ModelStore
from training.db import create_db_engine, create_tables
from training.holds import StepHolds
from training.jobs import Job, JobState, JobStore
from training.runner import RunnerSettings
from training.scheduler import SCHEDULER_NAME, start_scheduler, stop_scheduler
from training.spec import parse_job_spec
from training.workspace import JobWorkspace

FINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
PIPELINE_LM = ["split", "tokenise", "merge", "train", "evaluate", "register", "promote"]


@dataclass
class Jobs:
    store: JobStore
    models: ModelStore
    settings: RunnerSettings
    scheduler: Any

    def submit(self, raw: dict[str, Any], *, hold_after_steps: Sequence[int] = ()) -> Job:
        """Queue ``raw``; with ``hold_after_steps``, rank 0 of its train stage stops after each
        of those steps (once) until released: requested before the job exists, so no run of it
        can pass them first."""
        job_id = f"job-{uuid.uuid4().hex}"
        for step in hold_after_steps:
            self.holds(job_id).request(step)
        job = self.store.submit(parse_job_spec(raw), job_id=job_id)
        self.scheduler.wake.remote()
        return job

    def holds(self, job_id: str) -> StepHolds:
        workspace = JobWorkspace(Path(self.settings.jobs_dir), job_id)
        return StepHolds(folder=workspace.holds_dir)

    def wait_until_held(self, job: Job, step: int, *, timeout_s: float = 180.0) -> None:
        """Until rank 0 of the job's train stage reports itself held after ``step``."""
        holds = self.holds(job.id.value)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if holds.is_held(step):
                return
            current = self.store.get(job.id)
            if current.state in FINAL:
                break
            time.sleep(0.25)
        current = self.store.get(job.id)
        logs = "\n".join(line.message for line in self.store.logs(job.id))
        raise AssertionError(
            f"job {job.id.value} is {current.state} ({current.stage}), never held after "
            f"step {step}: {logs}"
        )

    def wait(self, job: Job, until: Callable[[Job], bool], *, timeout_s: float = 180.0) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            current = self.store.get(job.id)
            if until(current):
                return current
            time.sleep(0.25)
        logs = "\n".join(line.message for line in self.store.logs(job.id))
        raise AssertionError(f"job {job.id.value} is {current.state} ({current.stage}): {logs}")

    def finish(self, job: Job, *, timeout_s: float = 180.0) -> Job:
        return self.wait(job, lambda j: j.state in FINAL, timeout_s=timeout_s)


@pytest.fixture(scope="module")
def jobs(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    home: Path = tmp_path_factory.mktemp("loom-training")
    settings = RunnerSettings(
        db_url=f"sqlite:///{home / 'loom.db'}",
        models_dir=str(home / "models"),
        jobs_dir=str(home / "jobs"),
        queue_lease_s=6.0,
        debug_holds=True,
    )
    engine = create_db_engine(settings.db_url)
    create_tables(engine)
    scheduler = start_scheduler(settings, tick_s=0.2)
    try:
        yield Jobs(JobStore(engine), ModelStore(Path(settings.models_dir)), settings, scheduler)
    finally:
        stop_scheduler(ray.get_actor(SCHEDULER_NAME, namespace="loom"))
        engine.dispose()


def lm_job(name: str, **overrides: Any) -> dict[str, Any]:
    hyper = {
        "preset": "tiny",
        "max_corpus_mb": 0.3,
        "shards": 3,
        "vocab_size": 512,
        "seq_len": 32,
        "batch_size": 8,
        "max_steps": 40,
        "learning_rate": 3e-3,
        "checkpoint_every_steps": 10,
        **overrides.pop("hyperparameters", {}),
    }
    return {"name": name, "trainer": "lm", "hyperparameters": hyper, **overrides}


def alive_actors(class_name: str) -> list[int]:
    """Pids of the live actor processes of ``class_name``: Ray titles each ``ray::Class...``
    (its state API needs the dashboard, which the test Ray runs without)."""
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith(f"ray::{class_name}"):
            pids.append(process.info["pid"])
    return pids


def test_an_lm_job_survives_a_lost_worker_and_a_lost_scheduler_and_is_servable(
    jobs: Jobs,
) -> None:
    # checkpoints every 10 steps; rank 0 stops after step 15 (first group) and after step 35
    # (the group that resumed), each time once, so each kill below lands mid-train
    job = jobs.submit(
        lm_job(
            "lm-e2e", workers=2, stage_workers=2, promote=True, hyperparameters={"max_steps": 60}
        ),
        hold_after_steps=(15, 35),
    )
    # a train worker dies at step 15: the group restarts from the last checkpoint, step 10
    jobs.wait_until_held(job, 15)
    os.kill(alive_actors("TrainWorker")[-1], signal.SIGKILL)  # as on a lost node
    # the new group passes step 15 (that hold was taken) and is held at 35, after the
    # restart's log line (written before the group started) and the step-30 checkpoint
    jobs.wait_until_held(job, 35)
    logs = [line.message for line in jobs.store.logs(job.id)]
    restarted = [line for line in logs if "restarting the group of 2 (1/3)" in line]
    assert len(restarted) == 1, logs
    assert restarted[0].endswith("from step-00000010"), restarted
    # then the scheduler itself dies (its runner and workers with it); Ray starts it again
    # (max_restarts=-1) and the new one queues the job again to resume from step 30
    ray.kill(jobs.scheduler, no_restart=False)
    done = jobs.finish(job)
    assert done.state == JobState.SUCCEEDED, done.error
    logs = [line.message for line in jobs.store.logs(done.id)]
    requeued = [e for e in jobs.store.events(done.id) if e.type == "loom.job.queued"]
    assert len(requeued) == 2  # submitted, then queued again by the new scheduler
    assert "resumes from its last checkpoint" in requeued[1].data["error"]
    assert "train: resumed from step 30, the last checkpoint" in logs, logs
    # the second run skipped split, tokenise and merge: their outputs were on disk
    stages = [e.data["stage"] for e in jobs.store.events(done.id) if e.type == "loom.job.running"]
    assert stages == ["starting", *PIPELINE_LM[:4], "starting", *PIPELINE_LM[3:]]
    metrics = done.metrics
    # 60 steps of a tiny GPT-2 on 512 tokens: well under the uniform guess's perplexity of 512
    assert 1.0 < metrics["perplexity"] < 512
    assert metrics["version"] == "1"
    assert metrics["promoted"] is True
    assert jobs.models.aliases("lm-e2e") == {"serving": "1"}
    engine = build_engine("generate", jobs.models.open("lm-e2e", task="generate").path)
    engine.load()
    try:
        [generation] = engine.run([("def ", SamplingParams(max_tokens=5, ignore_eos=True))])
        assert len(generation.token_ids) == 5
    finally:
        engine.close()


def test_cancelling_a_training_job_stops_its_workers_and_removes_its_files(jobs: Jobs) -> None:
    job = jobs.submit(
        lm_job("lm-cancel", workers=2, hyperparameters={"max_steps": 40}), hold_after_steps=(2,)
    )
    jobs.wait_until_held(job, 2)  # mid-train, however fast the machine
    workspace = JobWorkspace(Path(jobs.settings.jobs_dir), job.id.value)
    assert workspace.path.exists()
    jobs.store.cancel(job.id)
    jobs.scheduler.wake.remote()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (workspace.path.exists() or alive_actors("TrainWorker")):
        time.sleep(0.25)
    assert not workspace.path.exists()
    assert alive_actors("TrainWorker") == []
    assert jobs.store.get(job.id).state == JobState.CANCELLED
