"""The scheduler: exactly one, a named Ray actor, that runs queued jobs as the cluster allows.

Order is priority, then submit order (``queue_order``, a pure function). Only the head of the
queue is considered: it gets a reservation (a Ray placement group of ``workers`` bundles of
``resources``), and when Ray can place all of it, the job starts; a smaller job behind it does
not overtake it, so a big job is never starved. A job's runner (``training.runner``) runs its
pipeline in the reservation; the scheduler writes the final state from the runner's outcome:

    scheduler = Scheduler(store, queue, launcher, jobs_dir=env.jobs_dir)
    while True:
        scheduler.tick()    # settle RUNNING jobs of a previous scheduler (first tick), reap
                            # leases, finish/cancel runs, write outcomes, start what fits

Cancelling (the API marks the job CANCELLED) is noticed at the next tick: the runner is
killed (its workers die with it), the reservation released, and the job's partial outputs
(workspace files, queue items) removed. A failed run is queued again while the spec's
``max_retries`` lasts; a filter's rejection is final. A launch that raises (Ray could not
start the runner) is a failed run too: its reservation is released at once and the same
``max_retries`` rule decides (``on_restart`` is about a lost scheduler, not a run that never
began).

No job is lost to a failed write. A run's outcome is kept in the scheduler's books
(``settling``) until the store has the state change it leads to; a write that raises a
transient error (``training.db.is_transient_error``: a SQLite lock wait past its busy
timeout, Postgres restarting, a dropped connection) is logged with the job id and tried again
at later ticks, after 0.5, 1, 2, ... s (capped at 30 s), for as long as it takes. A retry
after a write that did land changes nothing: the transition table refuses the same move twice
(``JobConflict``), and a settling job is never started meanwhile. A start (QUEUED -> RUNNING)
whose write raised a transient error keeps its reservation; the next tick reads the job and
launches it if the write did land.

A write refused for good (an ``IntegrityError``, a value the database cannot hold, a bug: it
would fail the same way at every try) is not retried. It is logged once, at ERROR with its
traceback and the job id, and the job is failed instead, naming the refused write (a start's
reservation is released first); that write is retried while its errors are transient. If the
store refuses that one for good too, the job is ``abandoned``: logged once more and left as
the store has it, untouched by this scheduler (never started or retried again); a restarted
scheduler's recovery settles a RUNNING one by its ``on_restart``.

After a restart, RUNNING jobs have lost their runner (it died with the old scheduler, its
owner). By the spec's ``on_restart``: ``resume`` queues the job again, and its pipeline skips
the stages already done and training resumes from the last checkpoint; ``fail`` fails it with
the reason.

The actor (``SchedulerService``, named ``loom-scheduler``) owns the loop thread and the
webhook deliverer's thread. The monitoring issue replaces "one named actor" with lease-based
ownership election.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from sqlalchemy import Connection

from training.db import is_transient_error
from training.jobs import Job, JobConflict, JobId, JobNotFound, JobState, JobStore
from training.leases import LeaseLost, Term
from training.runner import JobRunner, RunnerSettings, RunOutcome
from training.work_queue import WorkQueue, retry_delay_s
from training.workspace import JobWorkspace

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

logger = logging.getLogger(__name__)

SCHEDULER_NAME = "loom-scheduler"
NAMESPACE = "loom"


def queue_order(jobs: Iterable[Job]) -> list[Job]:
    """Higher priority first; equal priorities in submit order (then id, to be total)."""
    return sorted(jobs, key=lambda job: (-job.priority, job.created_at, job.id.value))


@dataclass(frozen=True, kw_only=True)
class AfterFailure:
    requeue: bool
    failed_runs: int
    reason: str


def after_failure(job: Job, error: str) -> AfterFailure:
    """What a failed run leads to: queued again while ``max_retries`` lasts, else failed.

    max_retries 2: the 1st and 2nd failures requeue, the 3rd fails the job."""
    failed_runs = int(job.metrics.get("failed_runs", 0)) + 1
    if failed_runs <= job.spec.max_retries:
        reason = f"run {failed_runs} failed ({error}); retrying"
        return AfterFailure(requeue=True, failed_runs=failed_runs, reason=reason)
    return AfterFailure(requeue=False, failed_runs=failed_runs, reason=error)


Reservation = TypeVar("Reservation")
"""A launcher's handle on the resources held for one job (Ray: ``PlacementReservation``)."""
Run = TypeVar("Run")
"""A launcher's handle on one started run of a job (Ray: ``RunnerRun``)."""


class Launcher(Protocol[Reservation, Run]):
    """What the scheduler asks of the cluster (Ray in ``RayLauncher``; a fake in tests). The
    scheduler only keeps the handles it is given and hands them back."""

    def reserve(self, job: Job) -> Reservation: ...

    def is_ready(self, reservation: Reservation) -> bool: ...

    def release(self, reservation: Reservation) -> None: ...

    def launch(self, job: Job, reservation: Reservation) -> Run: ...

    def outcome(self, run: Run) -> RunOutcome | None:
        """The run's outcome once it has ended; None while it runs."""

    def stop(self, run: Run) -> None: ...


@dataclass
class _Running(Generic[Reservation, Run]):
    reservation: Reservation
    run: Run


@dataclass
class _Settling:
    """A run that has ended (or never launched) whose state change is not yet in the store."""

    job: Job
    """The job as it was when its run ended: ``after_failure`` counts from its metrics."""
    outcome: RunOutcome
    failed_writes: int = 0
    retry_at_s: float = 0.0
    """On the scheduler's clock: the write is not tried again before this."""
    failing_instead: str | None = None
    """Set once the outcome's own write was refused for good: the job is failed with this
    reason instead, from ``require``."""
    require: JobState = JobState.RUNNING
    """The state the job must still be in for the write (QUEUED for a refused start)."""

    @property
    def write(self) -> str:
        """The write, as the log names it."""
        if self.failing_instead is not None:
            return "marking it failed"
        return f"writing the end of its run ({self.outcome.status})"


def error_text(exc: BaseException) -> str:
    """``IntegrityError: UNIQUE constraint failed: ...``: the driver's own error when SQLAlchemy
    wraps one (its text would repeat the statement and its parameters), cut to 300 chars."""
    orig = getattr(exc, "orig", None)
    shown = orig if isinstance(orig, BaseException) else exc
    text = f"{type(exc).__name__}: {shown}"
    return text if len(text) <= 300 else text[:297] + "..."


class Scheduler(Generic[Reservation, Run]):
    """The scheduling loop's state and decisions; no threads of its own (see the module)."""

    def __init__(
        self,
        store: JobStore,
        queue: WorkQueue,
        launcher: Launcher[Reservation, Run],
        *,
        jobs_dir: Path,
        sweep_interval_s: float = 10.0,
        write_retry_base_s: float = 0.5,
        write_retry_cap_s: float = 30.0,
        max_placement_wait_s: float = 600.0,
        retention_days: float = 7.0,
        retention_sweep_interval_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queue = queue
        self.launcher = launcher
        self.jobs_dir = Path(jobs_dir)
        self.running: dict[str, _Running[Reservation, Run]] = {}
        # jobs whose run ended (or failed to launch) and whose state change is still unwritten
        self.settling: dict[str, _Settling] = {}
        # jobs whose every write was refused for good: left as the store has them
        self.abandoned: set[str] = set()
        # (job id, reservation) of the head of the queue, while it waits for the cluster
        self.pending: tuple[str, Reservation] | None = None
        # when the pending job's reservation was asked for, on the scheduler's clock
        self._pending_since_s = 0.0
        self._max_placement_wait_s = max_placement_wait_s
        # the pending job's start was written but the write raised: it may have landed
        self._start_unconfirmed = False
        self._recovered = False
        self._sweep_interval_s = sweep_interval_s
        self._write_retry_base_s = write_retry_base_s
        self._write_retry_cap_s = write_retry_cap_s
        self._clock = clock
        self._last_sweep_s = -float("inf")
        self._retention_s = retention_days * 86_400.0
        self._retention_sweep_interval_s = retention_sweep_interval_s
        self._last_retention_sweep_s = -float("inf")
        # finished_at is epoch seconds: the retention cut-off is on the wall clock
        self._wall_clock = wall_clock
        self._swept: set[str] = set()

    def recover(self) -> list[str]:
        """Settle the RUNNING jobs a previous scheduler left, by each one's ``on_restart``.

        ``tick`` calls it until one call has settled every such job; a job whose write
        raises is logged and left for the next call."""
        settled = []
        complete = True
        ours = set(self.running) | set(self.settling) | self.abandoned
        if self.pending is not None and self._start_unconfirmed:
            ours.add(self.pending[0])
        for job in self.store.list(JobState.RUNNING):
            if job.id.value in ours:
                continue
            try:
                if job.spec.on_restart == "resume":
                    self.store.requeue(
                        job.id,
                        "the scheduler restarted while the job ran; it resumes from its last "
                        "checkpoint",
                    )
                else:
                    self.store.fail(job.id, "lost when the scheduler restarted (on_restart: fail)")
            except (JobConflict, JobNotFound):
                continue  # cancelled meanwhile
            except LeaseLost:
                raise  # the role is another server's now: stop, change nothing
            except Exception as exc:
                if not is_transient_error(exc):
                    lost = RunOutcome(status="error", error="lost when the scheduler restarted")
                    self._refused_for_good(job, lost, "its recovery after the restart", exc)
                    continue
                complete = False  # the store is away: the next tick tries again
                logger.warning(
                    "job %s: could not settle it after the restart (%s: %s); retrying",
                    job.id.value,
                    type(exc).__name__,
                    exc,
                )
                continue
            logger.info("recovered job %s (%s)", job.id.value, job.spec.on_restart)
            settled.append(job.id.value)
        self._recovered = complete
        return settled

    def tick(self) -> None:
        if not self._recovered:
            self.recover()
        self.queue.reap()
        self._finish_runs()
        self._settle_due()
        self._start_what_fits()
        now = self._clock()
        if now - self._last_sweep_s >= self._sweep_interval_s:
            self._last_sweep_s = now
            self.sweep_cancelled()
        if now - self._last_retention_sweep_s >= self._retention_sweep_interval_s:
            self._last_retention_sweep_s = now  # a sweep that raises waits for the next turn
            self.sweep_retention()

    # --- running jobs -------------------------------------------------------------------

    def _finish_runs(self) -> None:
        for job_id, running in list(self.running.items()):
            try:
                job = self.store.get(JobId(job_id))
            except JobNotFound:
                job = None
            if job is None or job.state != JobState.RUNNING:
                # cancelled through the API (or gone): stop everything, remove what it made
                self.launcher.stop(running.run)
                self._release(job_id, running.reservation)
                del self.running[job_id]
                self.clean_up(job_id)
                logger.info("stopped job %s: it is %s", job_id, job.state if job else "gone")
                continue
            outcome = self.launcher.outcome(running.run)
            if outcome is None:
                continue
            # the run is over: its reservation goes back now, and the job stays in the books
            # (settling) until its state change is written
            del self.running[job_id]
            self.settling[job_id] = _Settling(job, outcome)
            self._release(job_id, running.reservation)
            self._log_outcome(job_id, outcome)

    def _settle_due(self) -> None:
        """Write the state change of each ended run that is due; a failed write waits."""
        for job_id, settling in list(self.settling.items()):
            if self._clock() >= settling.retry_at_s:
                self._settle(job_id, settling)

    def _settle(self, job_id: str, settling: _Settling) -> None:
        """Try ``settling``'s write once: done, or retried later (transient), or the job
        failed instead (refused for good), or abandoned (failing it refused for good too)."""
        try:
            self._write(settling)
        except LeaseLost:
            raise  # the role is another server's now: its scheduler settles the run
        except Exception as exc:
            if is_transient_error(exc):
                self._retry_later(job_id, settling, exc)
            elif settling.failing_instead is None:
                what = f"the end of its run ({settling.outcome.status})"
                self._refused_for_good(settling.job, settling.outcome, what, exc)
            else:
                self._abandon(job_id, settling, exc)
            return
        del self.settling[job_id]
        if settling.failed_writes:
            logger.info(
                "job %s: %s is written (after %d failed writes)",
                job_id,
                "its failure" if settling.failing_instead else "the end of its run",
                settling.failed_writes,
            )

    def _write(self, settling: _Settling) -> None:
        if settling.failing_instead is None:
            self._apply(settling.job, settling.outcome)
            return
        with contextlib.suppress(JobConflict, JobNotFound):  # cancelled, or already written
            self.store.transition(
                settling.job.id,
                JobState.FAILED,
                error=settling.failing_instead,
                require=settling.require,
            )

    def _retry_later(self, job_id: str, settling: _Settling, exc: Exception) -> None:
        settling.failed_writes += 1
        delay_s = retry_delay_s(
            settling.failed_writes,
            base_s=self._write_retry_base_s,
            cap_s=self._write_retry_cap_s,
        )
        settling.retry_at_s = self._clock() + delay_s
        logger.warning(
            "job %s: %s failed (%s); try %d again in %.1f s",
            job_id,
            settling.write,
            error_text(exc),
            settling.failed_writes + 1,
            delay_s,
        )

    def _refused_for_good(
        self,
        job: Job,
        outcome: RunOutcome,
        what: str,
        exc: Exception,
        *,
        require: JobState = JobState.RUNNING,
    ) -> None:
        """The store refused ``what`` with an error no retry can pass: log it once, then fail
        the job instead (from ``require``), through the books like any other write."""
        job_id = job.id.value
        reason = f"the scheduler could not record {what}: {error_text(exc)}"
        logger.error(
            "job %s: the store refused %s for good (%s); failing the job instead",
            job_id,
            what,
            error_text(exc),
            exc_info=exc,
        )
        settling = _Settling(job, outcome, failing_instead=reason, require=require)
        self.settling[job_id] = settling
        self._settle(job_id, settling)

    def _abandon(self, job_id: str, settling: _Settling, exc: Exception) -> None:
        del self.settling[job_id]
        self.abandoned.add(job_id)
        logger.error(
            "job %s: the store refused marking it failed for good too (%s); it stays %s in "
            "the store and this scheduler leaves it (a restarted scheduler settles a running "
            "job by its on_restart)",
            job_id,
            error_text(exc),
            settling.require,
        )

    def _apply(self, job: Job, outcome: RunOutcome) -> None:
        """Write the state change ``outcome`` leads to, from RUNNING only; raises what the
        store raises, except a refusal: the job was cancelled between the outcome and now, or
        an earlier try of this same write did land (the job is no longer RUNNING)."""
        if outcome.status == "succeeded":
            new_state, error, metrics = JobState.SUCCEEDED, None, outcome.metrics
        elif outcome.status == "rejected":
            new_state, error, metrics = JobState.FAILED, outcome.error or "rejected", None
        else:  # an error; or "stopped" while the job is still RUNNING, which is one too
            decision = after_failure(job, outcome.error or "the run failed")
            new_state = JobState.QUEUED if decision.requeue else JobState.FAILED
            error, metrics = decision.reason, {"failed_runs": decision.failed_runs}
        with contextlib.suppress(JobConflict, JobNotFound):
            self.store.transition(
                job.id, new_state, error=error, metrics=metrics, require=JobState.RUNNING
            )

    @staticmethod
    def _log_outcome(job_id: str, outcome: RunOutcome) -> None:
        if outcome.status in ("succeeded", "rejected"):
            logger.info("job %s: run ended %s", job_id, outcome.status)
        else:  # the runner's own log has the traceback; this is the line the scheduler saw
            logger.warning("job %s: run ended %s: %s", job_id, outcome.status, outcome.error)

    def _release(self, job_id: str, reservation: Reservation) -> None:
        try:
            self.launcher.release(reservation)
        except Exception:  # the cluster refused; nothing the scheduler can hold on to
            logger.exception("job %s: releasing its reservation failed", job_id)

    def clean_up(self, job_id: str) -> None:
        """A cancelled job's partial outputs: its workspace and its queue items."""
        JobWorkspace(self.jobs_dir, job_id).remove()
        self.queue.purge(f"{job_id}/")
        self._swept.add(job_id)

    def sweep_cancelled(self) -> None:
        """Clean up jobs cancelled while queued (after an earlier run left files)."""
        for job in self.store.list(JobState.CANCELLED):
            if job.id.value not in self._swept and job.id.value not in self.running:
                self.clean_up(job.id.value)

    def sweep_retention(self) -> list[str]:
        """Remove what finished jobs keep past the retention period (``retention_days`` after
        they finished): their events, log lines, workspace files and queue items; the job
        rows stay. The ids swept."""
        cutoff = self._wall_clock() - self._retention_s
        swept = self.store.drop_history_before(cutoff)
        for job_id in swept:
            JobWorkspace(self.jobs_dir, job_id).remove()
            self.queue.purge(f"{job_id}/")
        if swept:
            logger.info("retention: swept %d finished jobs (%s)", len(swept), ", ".join(swept))
        return swept

    # --- starting jobs ------------------------------------------------------------------

    def _start_what_fits(self) -> None:
        if self._start_unconfirmed and not self._confirm_start():
            return
        while True:
            # a settling job may already be QUEUED in the store (its requeue landed but
            # reported failure): it starts again only once its own write is settled
            queued = [
                job
                for job in self.store.list(JobState.QUEUED)
                if job.id.value not in self.settling and job.id.value not in self.abandoned
            ]
            ordered = queue_order(queued)
            head = ordered[0] if ordered else None
            if self.pending is not None and (head is None or self.pending[0] != head.id.value):
                # the head changed (a higher priority came, or it was cancelled)
                self._release(self.pending[0], self.pending[1])
                self.pending = None
            if head is None:
                return
            if self.pending is None:
                self.pending = (head.id.value, self.launcher.reserve(head))
                self._pending_since_s = self._clock()
            reservation = self.pending[1]
            if not self.launcher.is_ready(reservation):
                # the cluster cannot place it yet; nothing behind it may overtake, so a head
                # that waits too long is failed rather than stopping the queue for everyone
                if self._fail_unplaceable(head, reservation):
                    continue
                return
            try:
                job = self.store.start(head.id, stage="starting")
            except JobConflict:  # cancelled between the list and now
                self.pending = None
                self._release(head.id.value, reservation)
                continue
            except LeaseLost:
                self.pending = None
                self._release(head.id.value, reservation)
                raise
            except Exception as exc:
                if not is_transient_error(exc):  # nothing landed, and nothing ever will
                    self.pending = None
                    self._release(head.id.value, reservation)
                    never = RunOutcome(status="error", error="its start was refused")
                    self._refused_for_good(head, never, "its start", exc, require=JobState.QUEUED)
                    continue
                # it may have landed: the next tick reads the job
                self._start_unconfirmed = True
                logger.warning(
                    "job %s: writing its start failed (%s: %s); the next tick checks it",
                    head.id.value,
                    type(exc).__name__,
                    exc,
                )
                return
            self.pending = None
            if not self._launch(job, reservation):
                return  # the next tick goes on (a requeued job is not relaunched at once)

    def _fail_unplaceable(self, head: Job, reservation: Reservation) -> bool:
        """Fail the head of the queue once it has waited ``max_placement_wait_s`` for its
        reservation: True when it is no longer the head (failed, or cancelled meanwhile)."""
        waited_s = self._clock() - self._pending_since_s
        if waited_s < self._max_placement_wait_s:
            return False
        spec = head.spec
        reason = (
            f"could not be placed for {waited_s:.0f} s (training.max_placement_wait_s is "
            f"{self._max_placement_wait_s:g}): {spec.workers} workers x "
            f"{spec.resources.cpu:g} CPUs, {spec.resources.gpu:g} GPUs each did not fit what "
            "the cluster had free"
        )
        try:
            self.store.transition(head.id, JobState.FAILED, error=reason, require=JobState.QUEUED)
        except (JobConflict, JobNotFound):
            pass  # cancelled meanwhile: the next look at the queue moves on
        except LeaseLost:
            raise
        except Exception as exc:
            if is_transient_error(exc):  # the reservation is kept; the next tick tries again
                logger.warning("job %s: failing it failed (%s)", head.id.value, error_text(exc))
                return False
            logger.error("job %s: failing it was refused (%s)", head.id.value, error_text(exc))
            self.abandoned.add(head.id.value)
        else:
            logger.warning("job %s: %s; failed", head.id.value, reason)
        self.pending = None
        self._release(head.id.value, reservation)
        return True

    def _confirm_start(self) -> bool:
        """After a start whose write raised: launch the job if the write landed. False when
        that launch failed (this tick starts nothing more), else True."""
        assert self.pending is not None
        job_id, reservation = self.pending
        job = self.store.get(JobId(job_id))  # raises while the store is still away: retried
        self._start_unconfirmed = False
        if job.state == JobState.RUNNING:
            self.pending = None
            logger.info("job %s: its start had landed", job_id)
            return self._launch(job, reservation)
        return True  # QUEUED: started afresh below; anything else: the head changed

    def _launch(self, job: Job, reservation: Reservation) -> bool:
        """Start the job's run in ``reservation``; a launch that raises is a failed run (its
        reservation released, its state change written or settling): False."""
        job_id = job.id.value
        try:
            run = self.launcher.launch(job, reservation)
        except Exception as exc:
            logger.exception("job %s: launching its run failed", job_id)
            self._release(job_id, reservation)
            outcome = RunOutcome(
                status="error", error=f"could not launch the job's run: {type(exc).__name__}: {exc}"
            )
            self.settling[job_id] = _Settling(job, outcome)
            self._settle_due()
            return False
        self.running[job_id] = _Running(reservation, run)
        logger.info("started job %s (priority %d)", job_id, job.priority)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "running": sorted(self.running),
            "settling": sorted(self.settling),
            "pending": self.pending and self.pending[0],
            "abandoned": sorted(self.abandoned),
        }

    def stop_all(self) -> None:
        """Stop every run and release every reservation (the service is shutting down). The
        jobs stay RUNNING in the store, for ``recover`` at the next start; an ended run's
        state change gets one more try first."""
        for job_id, running in self.running.items():
            self.launcher.stop(running.run)
            self._release(job_id, running.reservation)
        self.running.clear()
        for settling in self.settling.values():
            settling.retry_at_s = 0.0
        self._settle_due()
        self.settling.clear()
        if self.pending is not None:
            self._release(self.pending[0], self.pending[1])
            self.pending = None
            self._start_unconfirmed = False


def bundles_for(job: Job) -> list[dict[str, float]]:
    """The placement group of a job: one bundle per worker, ``resources`` each.

    2 workers x {cpu: 1, gpu: 0} -> [{"CPU": 1.0}, {"CPU": 1.0}]."""
    bundle = {"CPU": float(job.spec.resources.cpu)}
    if job.spec.resources.gpu:
        bundle["GPU"] = float(job.spec.resources.gpu)
    return [dict(bundle) for _ in range(job.spec.workers)]


# --- the Ray side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacementReservation:
    """A job's reservation: its placement group, and the ref that is ready once Ray placed it."""

    group: PlacementGroup
    ready: ObjectRef[bool]


@dataclass(frozen=True)
class RunnerRun:
    """A started run: the job's runner actor and the ref its ``RunOutcome`` arrives on."""

    actor: ActorHandle[JobRunner]
    outcome: ObjectRef[RunOutcome]


class RayLauncher:
    """Reservations as Ray placement groups; runs as ``JobRunner`` actors."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings

    def reserve(self, job: Job) -> PlacementReservation:
        from ray.util.placement_group import placement_group

        group = placement_group(bundles_for(job), strategy="PACK")
        return PlacementReservation(group=group, ready=group.ready())

    def is_ready(self, reservation: PlacementReservation) -> bool:
        import ray

        ready, _ = ray.wait([reservation.ready], timeout=0)
        return bool(ready)

    def release(self, reservation: PlacementReservation) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(reservation.group)

    def launch(self, job: Job, reservation: PlacementReservation) -> RunnerRun:
        import ray

        # the runner only coordinates: it takes no CPU of the job's reservation. Any: Ray's
        # stubs type neither a new actor's handle nor ``.remote`` on its methods
        runner: Any = (
            ray.remote(JobRunner).options(num_cpus=0, max_restarts=0).remote(self.settings)
        )
        return RunnerRun(actor=runner, outcome=runner.run.remote(job.id.value, reservation.group))

    def outcome(self, run: RunnerRun) -> RunOutcome | None:
        import ray

        ready, _ = ray.wait([run.outcome], timeout=0)
        if not ready:
            return None
        try:
            return ray.get(run.outcome)
        except ray.exceptions.RayActorError as exc:
            return RunOutcome(status="error", error=f"the job's runner was lost: {exc}")
        except ray.exceptions.RayError as exc:
            return RunOutcome(status="error", error=f"the job's runner failed: {exc}")

    def stop(self, run: RunnerRun) -> None:
        import ray

        ray.kill(run.actor)


class SchedulerService:
    """The scheduler actor's body: ``start_scheduler`` makes it the named actor
    ``loom-scheduler``. A loop thread ticks every ``tick_s`` or when woken (a submit or a
    cancel calls ``wake``); a second thread delivers webhooks, to addresses that are public
    or in ``webhook_allowed_networks`` (CIDR strings, ``training.webhook_addresses``)."""

    def __init__(
        self,
        settings: RunnerSettings,
        *,
        tick_s: float = 0.5,
        webhook_allowed_networks: Sequence[str] = (),
        max_placement_wait_s: float = 600.0,
        retention_days: float = 7.0,
        term: Term | None = None,
        lease_backend: str = "store",
    ) -> None:
        """``term``: the control-plane lease this scheduler acts under (None: it acts
        unelected, one server alone); every job state it writes is fenced by it, so once
        another holder's epoch has begun this one changes nothing and stops ticking.
        ``lease_backend``: where the lease lives (``store``: checked in the write's own
        transaction; ``kubernetes``: through the store's fencing tokens)."""
        from training.db import create_db_engine, create_tables
        from training.fences import FenceStore
        from training.leases import LeaseStore
        from training.webhook_addresses import WebhookAddressPolicy, parse_networks
        from training.webhooks import WebhookDeliverer

        engine = create_db_engine(settings.db_url, schema=settings.db_schema)
        create_tables(engine)
        fence = None
        if term is not None:
            checker = LeaseStore(engine) if lease_backend == "store" else FenceStore(engine)
            fence = functools.partial(_check_term, checker, term)
        self.term = term
        self.store = JobStore(engine, fence=fence)
        # its first tick settles the jobs a previous scheduler was running (``recover``)
        self.scheduler = Scheduler(
            self.store,
            WorkQueue(engine),
            RayLauncher(settings),
            jobs_dir=Path(settings.jobs_dir),
            max_placement_wait_s=max_placement_wait_s,
            retention_days=retention_days,
        )
        self._tick_s = tick_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._loop = threading.Thread(target=self._run, name="loom-scheduler", daemon=True)
        self._loop.start()
        policy = WebhookAddressPolicy(allowed_networks=parse_networks(webhook_allowed_networks))
        self._webhooks = WebhookDeliverer(self.store, policy=policy)
        self._webhook_thread = threading.Thread(
            target=self._webhooks.run_forever,
            args=(self._stop, 1.0),
            name="loom-webhooks",
            daemon=True,
        )
        self._webhook_thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.scheduler.tick()
            except LeaseLost as lost:  # another server holds the role: its scheduler acts
                logger.warning("scheduler stops: %s", lost)
                self._stop.set()
                return
            except Exception:  # a database hiccup must not end the loop
                logger.exception("scheduler tick failed; the next tick tries again")
            self._wake.wait(self._tick_s)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self.scheduler.status()

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._loop.join(timeout=10)
        with self._lock:
            self.scheduler.stop_all()


def start_scheduler(
    settings: RunnerSettings,
    *,
    tick_s: float = 0.5,
    webhook_allowed_networks: Sequence[str] = (),
    max_placement_wait_s: float = 600.0,
    retention_days: float = 7.0,
    term: Term | None = None,
    lease_backend: str = "store",
) -> ActorHandle[SchedulerService]:
    """The scheduler actor, started unless one is alive (``get_if_exists``: exactly one).

    ``max_restarts=-1``: if its process dies Ray starts it again, and ``recover`` settles the
    jobs it was running."""
    import ray

    actor: Any = (  # Ray's stubs type neither a new actor's handle nor ``.remote`` on methods
        ray.remote(SchedulerService)
        .options(
            name=SCHEDULER_NAME,
            namespace=NAMESPACE,
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=8,
        )
        .remote(
            settings,
            tick_s=tick_s,
            webhook_allowed_networks=tuple(webhook_allowed_networks),
            max_placement_wait_s=max_placement_wait_s,
            retention_days=retention_days,
            term=term,
            lease_backend=lease_backend,
        )
    )
    ray.get(actor.ping.remote())
    return actor


def stop_scheduler(actor: ActorHandle[SchedulerService]) -> None:
    import ray

    try:
        ray.get(actor.shutdown.remote(), timeout=30)
    except Exception as exc:  # already gone, or stuck: killed either way
        logger.info("scheduler did not shut down cleanly (%s); killing it", type(exc).__name__)
    ray.kill(actor, no_restart=True)


class _TermChecker(Protocol):
    def check(self, conn: Connection, term: Term) -> None: ...


def _check_term(checker: _TermChecker, term: Term, conn: Connection) -> None:
    """A ``JobStore`` fence: ``LeaseLost`` unless ``term`` still holds the role."""
    checker.check(conn, term)
