"""Training jobs on one local Ray: the scheduler actor runs the lm pipeline end to end, and
the job system survives what it must: a train worker killed and the scheduler itself restarted
(one job, both), and a cancel mid-train. Small data throughout (a ~0.3 MB slice of the
stdlib, a 2-layer GPT-2).
The digits pipeline runs end to end through `loom serve` (tests/e2e/test_training_e2e.py)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
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

    def submit(self, raw: dict[str, Any]) -> Job:
        job = self.store.submit(parse_job_spec(raw))
        self.scheduler.wake.remote()
        return job

    def wait(self, job: Job, until: Callable[[Job], bool], *, timeout_s: float = 180.0) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            current = self.store.get(job.id)
            if until(current):
                return current
            time.sleep(0.25)
        logs = "\n".join(line.message for line in self.store.logs(job.id))
        raise AssertionError(f"job {job.id.value} is {current.state} ({current.stage}): {logs}")

    def wait_for_log(self, job: Job, text: str, *, timeout_s: float = 180.0) -> str:
        """The first of the job's log lines that contains ``text``, once one does."""
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        while time.monotonic() < deadline:
            lines = [line.message for line in self.store.logs(job.id)]
            found = next((line for line in lines if text in line), None)
            if found is not None:
                return found
            time.sleep(0.25)
        raise AssertionError(f"job {job.id.value} never logged {text!r}: {lines}")

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
    job = jobs.submit(
        lm_job(
            "lm-e2e", workers=2, stage_workers=2, promote=True, hyperparameters={"max_steps": 60}
        )
    )
    # a train worker dies mid-train: the group restarts from the last checkpoint (step 10+)
    jobs.wait(job, lambda j: j.stage == "train" and j.metrics.get("step", 0) >= 15)
    os.kill(alive_actors("TrainWorker")[-1], signal.SIGKILL)  # as on a lost node
    # the runner restarts the group from its last checkpoint before anything else dies: on a
    # quiet machine 60 steps take ~10 s, and a scheduler killed first would take the runner
    # (and the restart it was about to log) with it
    restarted = jobs.wait_for_log(job, "restarting the group of 2 (1/3) from step-")
    resumed_at = int(restarted.rsplit("step-", 1)[1])
    jobs.wait(job, lambda j: j.metrics.get("step", 0) > resumed_at)
    # then the scheduler itself dies (its runner and workers with it); Ray starts it again
    # (max_restarts=-1) and the new one queues the job again to resume from a checkpoint
    ray.kill(jobs.scheduler, no_restart=False)
    done = jobs.finish(job)
    assert done.state == JobState.SUCCEEDED, done.error
    logs = [line.message for line in jobs.store.logs(done.id)]
    assert any("restarting the group of 2 (1/3) from step-" in line for line in logs), logs
    requeued = [e for e in jobs.store.events(done.id) if e.type == "loom.job.queued"]
    assert len(requeued) == 2  # submitted, then queued again by the new scheduler
    assert "resumes from its last checkpoint" in requeued[1].data["error"]
    assert any("train: resumed from step" in line for line in logs), logs
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
    job = jobs.submit(lm_job("lm-cancel", workers=2, hyperparameters={"max_steps": 5000}))
    jobs.wait(job, lambda j: j.stage == "train" and j.metrics.get("step", 0) >= 2)
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
