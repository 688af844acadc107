"""The faults benchmark's section (``benchmarks.faults``'s JSON): a replica killed under load,
overload at 3 x capacity, and ``loom serve`` killed with jobs queued (each when run).

    section = section(json.loads(Path("raw/faults.json").read_text()))
    [f.name for f in section.figures]   # faults.kill_failed_requests, ...

Figures are named ``<scenario>_<figure>``; the goals are the module's (its docstrings): no
failed request, accepted p99 within 2 x the unloaded one, memory within 10 %, every job
completed, no orphan process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from benchmarks.result import Section, Table, ratio, rounded

SCENARIOS = ("kill", "overload", "restart")
ACCEPTED_P99_OVER_UNLOADED_GOAL = 2.0
RSS_AFTER_OVER_BEFORE_GOAL = 1.1
"""Resident memory after the overload within 10 % of before."""
WINDOW_COLUMNS = ("window", "requests", "answered 200", "not answered 200", "p50 ms", "p99 ms")
"""A table row per load window: the module's ``summarise`` of it."""


def _text(value: float | None, digits: int = 0) -> str:
    """A number for a title or a note: ``1234.6`` -> ``"1235"``, None -> ``"n/a"``."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _window_row(label: str, window: Mapping[str, Any]) -> tuple[Any, ...]:
    """One ``summarise`` window of the module: requests, answered 200, the rest by kind."""
    return (
        label,
        window.get("requests"),
        window.get("ok"),
        ", ".join(f"{kind}: {n}" for kind, n in (window.get("not_ok") or {}).items()) or "none",
        rounded(window.get("p50_ms"), 2),
        rounded(window.get("p99_ms"), 2),
    )


def _kill(result: Section, kill: Mapping[str, Any]) -> None:
    result.figure(
        "kill_failed_requests", kill.get("failed_requests"), "requests", better="lower", goal=0
    )
    result.figure(
        "kill_p99_after_over_before", kill.get("p99_after_over_before"), "x", better="lower"
    )
    result.tables.append(
        Table(
            title=f"Replica killed under load: {kill.get('concurrency')} closed-loop users, "
            f"SIGKILL after {kill.get('before_s')} s, {kill.get('after_s')} s after",
            columns=WINDOW_COLUMNS,
            rows=[
                _window_row(label, kill[key])
                for key, label in (("before", "before the kill"), ("after_kill", "after it"))
                if isinstance(kill.get(key), Mapping)
            ],
            note=f"{kill.get('failed_requests')} failed over the whole run; the gateway sent "
            f"{_text(kill.get('gateway_retries'))} calls again; "
            f"replica processes at the end: {kill.get('replicas_after')}",
        )
    )


def _overload(result: Section, overload: Mapping[str, Any]) -> None:
    accepted = overload.get("accepted_req_per_s")
    result.figure("overload_accepted_req_per_s", accepted, "req/s")
    result.figure(
        "overload_accepted_over_capacity",
        ratio(accepted, overload.get("capacity_req_per_s")),
        "x",
    )
    result.figure("overload_shed_share", overload.get("shed_share"), "share", better="lower")
    result.figure(
        "overload_failed_other_share",
        overload.get("failed_other_share"),
        "share",
        better="lower",
        goal=0,
    )
    result.figure(
        "overload_accepted_p99_over_unloaded_p99",
        overload.get("accepted_p99_over_unloaded_p99"),
        "x",
        better="lower",
        goal=ACCEPTED_P99_OVER_UNLOADED_GOAL,
    )
    for part, value in (overload.get("rss_after_over_before") or {}).items():
        result.figure(
            f"overload_{part}_rss_after_over_before",
            value,
            "x",
            better="lower",
            goal=RSS_AFTER_OVER_BEFORE_GOAL,
        )
    windows = (
        ("unloaded", "unloaded (closed loop, c=1)"),
        ("saturated_closed_loop_c64", "capacity (closed loop, c=64)"),
        ("overloaded", "overload (open loop)"),
    )
    before = overload.get("rss_mib_before") or {}
    after = overload.get("rss_mib_after") or {}
    settled = overload.get("rss_mib_settled") or {}
    memory = ", ".join(
        f"{part} {_text(before[part])} -> {_text(after.get(part))} "
        f"(settled {_text(settled.get(part))}) MiB"
        for part in before
    )
    result.tables.append(
        Table(
            title=f"Overload: open-loop arrivals at {_text(overload.get('offered_req_per_s'))} "
            f"req/s for {overload.get('overload_s')} s against a capacity of "
            f"{_text(overload.get('capacity_req_per_s'))} req/s",
            columns=WINDOW_COLUMNS,
            rows=[
                _window_row(label, overload[key])
                for key, label in windows
                if isinstance(overload.get(key), Mapping)
            ],
            note=f"resident memory: {memory or 'not recorded'}",
        )
    )


def _restart(result: Section, restart: Mapping[str, Any]) -> None:
    submitted, completed = restart.get("jobs_submitted"), restart.get("jobs_completed")
    not_completed = None if submitted is None or completed is None else submitted - completed
    result.figure("restart_jobs_not_completed", not_completed, "jobs", better="lower", goal=0)
    result.figure(
        "restart_killed_run_processes_after_ready",
        restart.get("killed_run_processes_after_ready"),
        "processes",
        better="lower",
        goal=0,
    )
    result.figure("restart_serving_again_s", restart.get("serving_again_s"), "s", better="lower")
    result.figure("restart_jobs_final_s", restart.get("jobs_final_s"), "s", better="lower")
    result.tables.append(
        Table(
            title="loom serve SIGKILLed with jobs queued and running, then started again",
            columns=("job", "at the kill", "on_restart", "final", "error"),
            rows=[
                tuple(job.get(key) for key in ("id", "at_kill", "on_restart", "final", "error"))
                for job in restart.get("jobs") or []
                if isinstance(job, Mapping)
            ],
            note=f"cleaned up after {_text(restart.get('cleaned_up_s'), 1)} s, ready after "
            f"{_text(restart.get('ready_s'), 1)} s, serving after "
            f"{_text(restart.get('serving_again_s'), 1)} s; "
            f"{restart.get('ray_processes_left_after_clean_stop')} Ray processes left after a "
            "clean stop",
        )
    )


_ADD: dict[str, Callable[[Section, Mapping[str, Any]], None]] = {
    "kill": _kill,
    "overload": _overload,
    "restart": _restart,
}


def _asked(raw: Mapping[str, Any]) -> list[str]:
    """The scenarios the run was asked for (its ``--scenarios``), the module's default when
    the JSON does not say."""
    text = (raw.get("args") or {}).get("scenarios") or "kill,overload"
    return [s.strip() for s in str(text).split(",") if s.strip()]


def section(raw: Mapping[str, Any]) -> Section:
    """``failed`` when no scenario was recorded; one asked for and missing is a note, one
    not asked for is left out, one that cannot be read is a note too."""
    result = Section(name="faults")
    recorded = [s for s in SCENARIOS if isinstance(raw.get(s), Mapping)]
    if not recorded:
        result.status, result.error = "failed", "the faults module recorded no scenario"
        return result
    for scenario in _asked(raw):
        if scenario not in recorded:
            result.notes.append(f"{scenario}: asked for, not recorded")
    for scenario in recorded:
        try:
            _ADD[scenario](result, raw[scenario])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            result.notes.append(f"{scenario}: not read to the end ({type(exc).__name__}: {exc})")
    return result
