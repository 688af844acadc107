"""Runs a plan's steps one after the other, each its module in its own process group, with
a live progress line (benchmark, the module's last line: its set-up and level, seconds
left), and reads each module's JSON into its report section.

    outcome = run_step(step, run_dir, progress)   # the Section, its log in RUN/logs/

A module that fails, hangs past its limit or is interrupted still gives a section: what it
wrote is read (a module writes its JSON as it goes or at its end), and the section says
``failed`` with the last lines of its log. Ctrl-C stops the module's whole group (its servers
and Ray with it) before the run writes what it has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from benchmarks.plan import Step
from benchmarks.result import Section
from benchmarks.sections import extract

logger = logging.getLogger("benchmarks")

STOP_GRACE_S = 90.0
"""After SIGINT, how long a module gets to stop its servers and Ray before SIGKILL."""
TAIL_LINES = 15


def limit_s(step: Step) -> float:
    """The longest a step may run before it is stopped: its estimate several times over,
    and never under 10 minutes (a busy machine is slow, a hung one is not)."""
    return max(600.0, 4.0 * step.estimate_s)


class Progress:
    """One line per run on a terminal (rich), plain lines otherwise (a CI log)."""

    def __init__(self, total_s: float, *, live: bool | None = None) -> None:
        from rich.console import Console

        self._console = Console(stderr=True)
        self._live = self._console.is_terminal if live is None else live
        self._total_s, self._done_s = total_s, 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self._live:
            from rich.progress import BarColumn, TextColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("[bold]{task.fields[step]}[/bold]"),
                BarColumn(),
                TextColumn("{task.fields[left]}"),
                TextColumn("{task.fields[line]}", style="dim"),
                console=self._console,
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self._total_s, step="", left="", line="")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, exc, tb)

    def started(self, step: Step, index: int, count: int) -> None:
        self._label = f"{step.name} ({index}/{count})"
        if not self._live:
            self._console.print(f"loom bench: {self._label} started, about {step.estimate_s:.0f} s")

    def update(self, step: Step, elapsed_s: float, line: str) -> None:
        if self._bar is None:
            return
        left_s = max(0.0, self._total_s - self._done_s - min(elapsed_s, step.estimate_s))
        self._bar.update(
            self._task,
            completed=self._done_s + min(elapsed_s, step.estimate_s),
            step=self._label,
            left=f"~{left_s:.0f} s left",
            line=line[:70],
        )

    def finished(self, step: Step, section: Section) -> None:
        self._done_s += step.estimate_s
        text = f"loom bench: {step.name} {section.status} in {section.wall_s or 0:.0f} s"
        if section.error:
            text += f": {section.error.splitlines()[-1][:160]}"
        self._console.print(text)


def _pump(stream: IO[str], log: IO[str], tail: deque[str]) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if line.strip():
            tail.append(line.rstrip())


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGINT to the module's group (its own handler stops its servers), SIGKILL after
    ``STOP_GRACE_S``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def read_raw(path: Path) -> dict[str, Any] | None:
    """A module's JSON, None where it wrote none or wrote something else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def section_for(
    step: Step, raw: dict[str, Any] | None, *, returncode: int | None, tail: str
) -> Section:
    """The step's section from what the module wrote and how it ended.

    A module that finished writes its whole JSON even when a part failed or a goal was
    missed (and then exits 1): its section reports what it has, notes the exit status, and
    says ``failed`` only where its extractor finds nothing usable. A module stopped before
    its end (what it wrote so far is kept), or one that wrote no JSON, gives a ``failed``
    section with its log's tail."""
    if raw is None:
        ended = "stopped before it finished" if returncode is None else f"exit status {returncode}"
        return Section(
            name=step.name,
            status="failed",
            error=f"{ended}, no JSON written; the log's last lines:\n{tail}",
        )
    try:
        section = extract(step.name, raw)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        logger.exception("%s: its JSON could not be read into a report", step.name)
        return Section(
            name=step.name, status="failed", error=f"its JSON could not be read: {exc!r}"
        )
    if returncode is None:
        section.status = "failed"
        section.error = f"stopped before it finished; the log's last lines:\n{tail}"
        return section
    if returncode != 0:
        section.notes.append(
            f"the module exited with status {returncode} (a part failed or a goal was "
            f"missed): see logs/{step.name}.log"
        )
    return section


def run_step(step: Step, run_dir: Path, progress: Progress) -> Section:
    """Run one step to its end (or its limit, or Ctrl-C: re-raised after the module is
    stopped and its section kept in ``interrupted``)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "raw").mkdir(parents=True, exist_ok=True)
    command = step.command(sys.executable, str(run_dir))
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    returncode: int | None = None
    interrupted: BaseException | None = None
    with open(run_dir / "logs" / f"{step.name}.log", "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        assert process.stdout is not None
        reader = threading.Thread(target=_pump, args=(process.stdout, log, tail), daemon=True)
        reader.start()
        try:
            while process.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > limit_s(step):
                    tail.append(
                        f"loom bench: stopped after {elapsed:.0f} s (limit {limit_s(step):.0f} s)"
                    )
                    _stop_group(process)
                    break
                progress.update(step, elapsed, tail[-1] if tail else "starting")
                time.sleep(0.5)
            else:
                returncode = process.returncode
        except KeyboardInterrupt as exc:
            interrupted = exc
            _stop_group(process)
        reader.join(timeout=10)
    section = section_for(
        step, read_raw(run_dir / step.raw), returncode=returncode, tail="\n".join(tail)
    )
    section.command = ["python", *step.command("", str(run_dir))[1:]]
    section.wall_s = round(time.monotonic() - started, 1)
    section.raw = step.raw
    if interrupted is not None:
        raise Interrupted(section) from interrupted
    return section


class Interrupted(Exception):
    """Ctrl-C during a step: the step's section as far as it got."""

    def __init__(self, section: Section) -> None:
        super().__init__(section.name)
        self.section = section
