"""Debug holds: a train worker that stops at a step a test named, and says so.

A test that kills a worker mid-train must know the worker *is* mid-train. Waiting a while, or
for a progress report, races the machine: on a quiet one a tiny model finished its 60 steps
before the kill landed, and the restart the test awaited never came. So the worker reports
where it is instead. The test asks for a hold at step N before training gets there; rank 0,
once it has finished step N (its checkpoint written, if N is a checkpoint step), takes the
request (renames ``step-N`` to ``step-N.held``: that file is its report) and waits until the
file is removed. The other ranks wait for it at their next collective.

    holds = StepHolds(workspace.holds_dir)
    holds.request(15)         # before the job's train stage reaches step 15
    ...                       # poll holds.is_held(15): rank 0 is held after step 15
    os.kill(worker_pid, signal.SIGKILL)   # the group is lost at step 15, not after it
    holds.release(15)         # or, with nothing killed, let it go on

Who can turn holds on: only the process that starts the scheduler, with
``RunnerSettings(debug_holds=True)`` (the test harness); ``loom serve`` never does, so in
production no worker even looks. A request is a file in the job's workspace, whose path comes
from the job id alone, and no API route or spec field writes files there: a job submitter
cannot hold a job, and this is no field of the ``JobSpec``.

Bounded: a hold lasts at most ``max_hold_s`` (default 60 s, below the 120 s a rank's
collectives wait for a silent peer), then training goes on and ``step-N.held`` becomes
``step-N.expired``, with a warning logged. A request is taken once: a group restarted after
the kill, resuming from an earlier checkpoint, passes step N without stopping.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MAX_HOLD_S = 60.0
"""The longest a hold lasts: under ``run_rank``'s 120 s collective timeout, so the ranks
waiting on the held one do not fail first."""


@dataclass(frozen=True, kw_only=True)
class StepHolds:
    """Hold requests for one job's train stage: files in ``folder`` (``JobWorkspace.holds_dir``).

    Picklable plain data: the runner sends it to rank 0's process."""

    folder: Path
    max_hold_s: float = DEFAULT_MAX_HOLD_S
    poll_interval_s: float = 0.05

    def _requested(self, step: int) -> Path:
        return self.folder / f"step-{step}"

    def _held(self, step: int) -> Path:
        return self.folder / f"step-{step}.held"

    def request(self, step: int) -> None:
        """Ask rank 0 to stop after step ``step`` (1-based: the step count done)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._requested(step).touch()

    def is_held(self, step: int) -> bool:
        """True while rank 0 is held after step ``step`` (or died held there)."""
        return self._held(step).exists()

    def release(self, step: int) -> None:
        """Let a held rank go on; nothing if none is held there."""
        self._held(step).unlink(missing_ok=True)

    def hold_after(self, step: int) -> None:
        """Rank 0's side, after each step: stop here if ``step`` was requested, until released
        or ``max_hold_s`` has passed. One rename a step when nothing is requested."""
        try:
            os.rename(self._requested(step), self._held(step))  # taken once, by one process
        except FileNotFoundError:
            return
        logger.info("train rank 0 held after step %d (debug hold in %s)", step, self.folder)
        deadline = time.monotonic() + self.max_hold_s
        while self.is_held(step):
            if time.monotonic() >= deadline:
                try:
                    os.replace(self._held(step), self.folder / f"step-{step}.expired")
                except FileNotFoundError:
                    break  # released just now
                logger.warning(
                    "debug hold after step %d expired after %.0f s; training goes on",
                    step,
                    self.max_hold_s,
                )
                return
            time.sleep(self.poll_interval_s)
        logger.info("train rank 0 released after step %d", step)
