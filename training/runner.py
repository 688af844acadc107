"""The job runner: one Ray actor per running job, which runs the job's pipeline.

The scheduler starts it inside the job's placement group (the reservation of ``workers`` x
``resources``) and waits on ``run``; the runner starts the job's queue workers and train
workers in that group's bundles, so a job never uses more of the cluster than it reserved:

    runner = ray.remote(JobRunner).options(num_cpus=0).remote(settings)
    outcome = ray.get(runner.run.remote("job-1f2e", placement_group))
    # RunOutcome(status="succeeded", metrics={...})

The runner records the job's stage, progress, metrics and log lines; the final state is the
scheduler's to write, from the outcome. Killing the runner kills the workers it started
(Ray actors die with their owner), and removing the placement group does too.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from models.store import ModelStore
from training.db import create_db_engine
from training.holds import StepHolds
from training.jobs import JobId, JobState, JobStore
from training.program import ProgramSpec, TrainingStopped
from training.queue_workers import QueueWorker
from training.stages import JobStopped, Stage, StageContext, StageRejected, run_stages
from training.trainers.registry import TRAINERS
from training.work_queue import WorkQueue
from training.workspace import JobWorkspace

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from training.coordinated import CoordinatedResult

logger = logging.getLogger(__name__)

OutcomeStatus = Literal["succeeded", "rejected", "stopped", "error"]


@dataclass(frozen=True, kw_only=True)
class RunnerSettings:
    """Where a runner finds the store; plain data, sent to each runner actor."""

    db_url: str
    models_dir: str
    jobs_dir: str
    db_schema: str | None = None
    """A Postgres schema for every table (tests); None: the default."""
    queue_lease_s: float = 20.0
    """Lease of a queue item; a dead worker's item returns after this (heartbeats every third)."""
    debug_holds: bool = False
    """Fault injection for tests: train workers honour hold requests in a job's workspace
    (``training.holds``). Only whoever starts the scheduler sets it; ``loom serve`` does not."""


@dataclass(frozen=True, kw_only=True)
class RunOutcome:
    status: OutcomeStatus
    """succeeded; rejected by a filter stage (not retried); stopped by a cancel; error."""
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class TrainProgressSink:
    """Rank 0's step reports -> the job's progress and metrics, at most every ``interval_s``.

    Picklable (it travels to the train worker) and opens its own store there."""

    settings: RunnerSettings
    job_id: str
    span: tuple[float, float]
    interval_s: float = 1.0
    log_every_fraction: float = 0.1

    def __post_init__(self) -> None:
        self._store: JobStore | None = None
        self._last_s = 0.0
        self._last_logged = -1

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_store"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._store = None

    def __call__(self, step: int, max_steps: int, loss: float) -> None:
        now = time.monotonic()
        if now - self._last_s < self.interval_s and step < max_steps:
            return
        self._last_s = now
        if self._store is None:
            self._store = JobStore(
                create_db_engine(self.settings.db_url, schema=self.settings.db_schema)
            )
        start, end = self.span
        job = JobId(self.job_id)
        self._store.report_progress(
            job,
            progress=start + (end - start) * step / max_steps,
            metrics={"step": step, "max_steps": max_steps, "loss": round(float(loss), 5)},
        )
        # a log line every 10% of the steps: 200 steps -> steps 20, 40, ...
        tenth = int(step / max_steps / self.log_every_fraction)
        if tenth > self._last_logged:
            self._last_logged = tenth
            self._store.log(job, f"train: step {step}/{max_steps}, loss {loss:.4f}", stage="train")


class QueueWorkerGroup:
    """The queue workers of one stage, in the job's placement group's bundles."""

    def __init__(
        self,
        settings: RunnerSettings,
        *,
        count: int,
        queue: str,
        handler: str,
        placement_group: PlacementGroup | None,
        bundles: int,
        cpu_per_bundle: float,
        max_replacements: int = 3,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._handler = handler
        self._pg = placement_group
        self._bundles = max(1, bundles)
        # n workers share the bundles: 3 workers over 2 bundles of 1 CPU -> 2 per bundle,
        # 0.5 CPU each, so every bundle holds its share
        per_bundle = math.ceil(count / self._bundles)
        self._cpu = cpu_per_bundle / per_bundle
        self._replacements_left = max_replacements
        self._workers = [self._start(i) for i in range(count)]
        self._next_index = count

    def _start(self, index: int) -> tuple[ActorHandle[QueueWorker], ObjectRef[int]]:
        options: dict[str, Any] = {"num_cpus": self._cpu, "max_restarts": 0}
        if self._pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=index % self._bundles
            )
        actor: Any = (  # Ray's stubs type neither a new actor's handle nor ``.remote`` on methods
            ray.remote(QueueWorker)
            .options(**options)
            .remote(
                self._settings.db_url,
                f"{self._queue}#{index}",
                schema=self._settings.db_schema,
            )
        )
        ref = actor.run.remote(self._queue, self._handler, lease_s=self._settings.queue_lease_s)
        return actor, ref

    def keep_alive(self) -> None:
        """Replace a worker that died (its lease comes back when the reaper takes it)."""
        for i, (_actor, ref) in enumerate(self._workers):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                # the queue's name is <job>/<stage>: the job id is in the line
                logger.warning("a queue worker of %s died: %s", self._queue, exc)
                if self._replacements_left <= 0:
                    raise RuntimeError(
                        f"queue workers of {self._queue} keep dying; gave up"
                    ) from None
                self._replacements_left -= 1
                self._workers[i] = self._start(self._next_index)
                self._next_index += 1

    def stop(self) -> None:
        for actor, _ in self._workers:
            ray.kill(actor)
        self._workers = []


@dataclass
class RayWorkers:
    """How a running job's stages start workers: ``context.services["workers"]``."""

    settings: RunnerSettings
    job_id: str
    placement_group: PlacementGroup | None
    workers: int
    cpu: float
    gpu: float

    def queue_workers(self, count: int, queue: str, handler: str) -> QueueWorkerGroup:
        return QueueWorkerGroup(
            self.settings,
            count=count,
            queue=queue,
            handler=handler,
            placement_group=self.placement_group,
            bundles=self.workers,
            cpu_per_bundle=self.cpu,
        )

    def _holds(self, context: StageContext[Any]) -> StepHolds | None:
        """The job's debug holds when the runner's settings honour them (tests only)."""
        if not self.settings.debug_holds:
            return None
        return StepHolds(folder=context.workspace.holds_dir)

    def train(
        self, context: StageContext[Any], program: ProgramSpec, *, checkpoint_every_steps: int
    ) -> CoordinatedResult:
        """Run ``program`` as a coordinated batch on the job's ``workers`` (one per bundle)."""
        from training.coordinated import run_coordinated

        def restart_log(reason: str) -> None:
            # why the group restarts (a lost worker): the job's log, and this process's
            logger.warning("job %s: train: %s", self.job_id, reason)
            context.log(reason)

        started = time.perf_counter()
        result = run_coordinated(
            program,
            world_size=self.workers,
            checkpoint_dir=str(context.workspace.checkpoint_dir),
            checkpoint_every_steps=checkpoint_every_steps,
            num_cpus=self.cpu,
            num_gpus=self.gpu,
            placement_group=self.placement_group,
            progress=TrainProgressSink(self.settings, self.job_id, context.progress_span),
            hold=self._holds(context),
            log=restart_log,
            should_stop=context.should_stop,
        )
        elapsed_s = time.perf_counter() - started
        steps = result.metrics.get("steps", 0) - result.metrics.get("resumed_from_step", 0)
        batch = program.params.get("batch_size", 0)
        resumed = int(result.metrics.get("resumed_from_step", 0))
        if resumed:
            context.log(f"train: resumed from step {resumed}, the last checkpoint")
        context.log(f"train: {steps:g} steps in {elapsed_s:.1f} s, {result.restarts} restarts")
        result.metrics["train_seconds"] = elapsed_s
        if steps and elapsed_s > 0:
            # the whole stage: worker start, joining, resuming, the steps, evaluation, saving
            result.metrics["samples_per_s"] = steps * batch / elapsed_s
        loop_s = result.metrics.get("loop_seconds", 0.0)
        if steps and loop_s > 0 and not result.restarts:
            result.metrics["loop_samples_per_s"] = steps * batch / loop_s
        return result


class JobRunner:
    """The body of a runner actor (see the module docstring)."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        engine = create_db_engine(settings.db_url, schema=settings.db_schema)
        self.store = JobStore(engine)
        self.queue = WorkQueue(engine)
        self.models = ModelStore(Path(settings.models_dir))
        self._stop_checked_s = 0.0
        self._stopped = False

    def run(self, job_id: str, placement_group: PlacementGroup | None = None) -> RunOutcome:
        job_ref = JobId(job_id)
        job = self.store.get(job_ref)
        spec = job.spec
        workspace = JobWorkspace(Path(self.settings.jobs_dir), job_id)
        workspace.ensure()

        def log(message: str) -> None:
            self.store.log(job_ref, message, stage=current["stage"])

        def should_stop() -> bool:
            # one read of the job's row a second at most, however often stages ask
            now = time.monotonic()
            if not self._stopped and now - self._stop_checked_s >= 1.0:
                self._stop_checked_s = now
                self._stopped = self.store.get(job_ref).state != JobState.RUNNING
            return self._stopped

        current: dict[str, str | None] = {"stage": None}

        def on_stage(stage: Stage[Any]) -> None:
            current["stage"] = stage.name
            self.store.enter_stage(job_ref, stage.name)

        def on_progress(fraction: float) -> None:
            self.store.report_progress(job_ref, progress=fraction)

        context = StageContext(
            job_id=job_id,
            spec=spec,
            workspace=workspace,
            log=log,
            should_stop=should_stop,
            services={
                "jobs": self.store,
                "queue": self.queue,
                "models": self.models,
                "workers": RayWorkers(
                    self.settings,
                    job_id,
                    placement_group,
                    workers=spec.workers,
                    cpu=spec.resources.cpu,
                    gpu=spec.resources.gpu,
                ),
            },
        )
        try:
            outputs = run_stages(
                TRAINERS.stages(spec.trainer), context, on_stage=on_stage, on_progress=on_progress
            )
        except StageRejected as exc:
            log(f"rejected: {exc.reason}")
            return RunOutcome(status="rejected", error=exc.reason)
        except (JobStopped, TrainingStopped):
            return RunOutcome(status="stopped", error="cancelled")
        except Exception as exc:
            log(f"failed: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
            logger.exception("job %s failed in stage %s", job_id, current["stage"])
            return RunOutcome(status="error", error=f"{type(exc).__name__}: {exc}")
        return RunOutcome(status="succeeded", metrics=TRAINERS.job_metrics(spec.trainer, outputs))
