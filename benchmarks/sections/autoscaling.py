"""The autoscaling benchmark's section (``benchmarks.autoscaling``'s JSON): per set-up (Loom's
policy on the sidecars, on Prometheus, Ray Serve's own policy) how fast a load step gets a
second replica serving and what the step's p95 was; the sidecar's CPU share, the policy's
cost per decision and the control plane's failover when run.

    section = section(json.loads(Path("raw/autoscaling.json").read_text()))
    [f.name for f in section.figures]   # autoscaling.loom_sidecars_reaction_s, ...

Goals are the module's: reaction <= its ``reaction_goal_s`` (15 s), the step's p95 within the
SLO (``slo_ms``), the sidecar <= 2 % of the replicas' CPU on a model that computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.result import Chart, Section, Table, rounded

SETUPS = ("loom-sidecars", "loom-prometheus", "serve-policy")
"""The module's set-ups, its default order."""
LOAD_STEP = {"load step": 0.0}
"""Timelines are seconds from the load step."""


def _figure_key(setup: str) -> str:
    """``loom-sidecars`` -> ``loom_sidecars``: figure names use underscores."""
    return setup.replace("-", "_")


def _asked(raw: Mapping[str, Any]) -> list[str]:
    """The set-ups the run was asked for (its ``--setups``), the module's default when the
    JSON does not say."""
    text = (raw.get("args") or {}).get("setups") or ",".join(SETUPS)
    return [s.strip() for s in str(text).split(",") if s.strip()]


def _setup(result: Section, run: Mapping[str, Any]) -> None:
    name, key = run["setup"], _figure_key(run["setup"])
    reaction = run.get("reaction_s")
    if reaction is None:
        result.notes.append(f"{name}: no second replica served within the module's deadline")
    result.figure(
        f"{key}_reaction_s", reaction, "s", better="lower", goal=run.get("reaction_goal_s")
    )
    result.figure(
        f"{key}_step_p95_ms", run.get("step_p95_ms"), "ms", better="lower", goal=run.get("slo_ms")
    )
    result.figure(f"{key}_sidecar_cpu_share", run.get("sidecar_cpu_share"), "share", better="lower")
    if run.get("failed"):
        result.notes.append(f"{name}: {run['failed']} of {run.get('answers')} requests failed")


def _setups_table(runs: Sequence[Mapping[str, Any]]) -> Table:
    return Table(
        title="Autoscaling: a load step on one replica, 1 -> 2 replicas",
        columns=(
            "set-up",
            "reaction s",
            "replica running after s",
            "step p95 ms",
            "SLO ms",
            "answers",
            "failed",
            "sidecar cores",
            "sidecar CPU share",
        ),
        rows=[
            (
                run["setup"],
                rounded(run.get("reaction_s"), 1),
                rounded(run.get("running_replicas_after_s"), 1),
                rounded(run.get("step_p95_ms"), 0),
                run.get("slo_ms"),
                run.get("answers"),
                run.get("failed"),
                rounded(run.get("sidecar_cores"), 4),
                rounded(run.get("sidecar_cpu_share"), 4),
            )
            for run in runs
        ],
        note="reaction: the load step to a second replica serving traffic; replica running: "
        "to the count decided and started. These replicas' engine time is a sleep, so their "
        "CPU share is not the sidecar goal's measure (that is the MiniLM one)",
    )


def _points(run: Mapping[str, Any], part: str) -> list[tuple[float, float]]:
    """A set-up's ``timeline[part]`` as (t_s, value) points; a malformed point left out."""
    points = (run.get("timeline") or {}).get(part) or []
    return [(p[0], p[1]) for p in points if isinstance(p, list | tuple) and len(p) == 2]


def _timeline_chart(
    runs: Sequence[Mapping[str, Any]], part: str, file: str, title: str, y_label: str
) -> Chart:
    """One series per set-up of its ``timeline[part]`` ([[t_s, value], ...])."""
    return Chart(
        file=file,
        title=title,
        x_label="seconds from the load step",
        y_label=y_label,
        kind="step" if part == "replicas" else "line",
        series={run["setup"]: _points(run, part) for run in runs},
        vlines=dict(LOAD_STEP),
    )


def _without_ray(result: Section, raw: Mapping[str, Any]) -> None:
    cost = raw.get("policy_cost") or {}
    result.figure(
        "policy_adapter_us_per_call", cost.get("adapter_us_per_call"), "us", better="lower"
    )
    result.figure("policy_decide_us_per_call", cost.get("decide_us_per_call"), "us", better="lower")
    for timings, seconds in (raw.get("failover_s") or {}).items():
        result.figure(f"failover_{timings}_s", seconds, "s", better="lower")
    share = raw.get("cpu_share")
    if share:
        result.figure(
            "minilm_sidecar_cpu_share",
            share.get("sidecar_cpu_share"),
            "share",
            better="lower",
            goal=share.get("goal"),
        )
        result.notes.append(
            f"sidecar CPU under load on {share.get('model')}: "
            f"{rounded(share.get('sidecar_cores'), 4)} cores against the replicas' "
            f"{rounded(share.get('replica_cores'), 2)}"
        )


def section(raw: Mapping[str, Any]) -> Section:
    """``failed`` when nothing was recorded; a set-up asked for and missing (the module skips
    ``loom-prometheus`` without a ``prometheus`` binary) is a note."""
    result = Section(name="autoscaling")
    runs = [
        run
        for run in raw.get("setups") or []
        if isinstance(run, Mapping) and isinstance(run.get("setup"), str)
    ]
    if not (runs or raw.get("policy_cost") or raw.get("failover_s") or raw.get("cpu_share")):
        result.status, result.error = "failed", "the autoscaling module recorded nothing"
        return result
    recorded = {run["setup"] for run in runs}
    for name in _asked(raw):
        if name not in recorded:
            result.notes.append(f"{name}: skipped (asked for, not recorded)")
    for run in runs:
        try:
            _setup(result, run)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            result.notes.append(
                f"{run['setup']}: not read to the end ({type(exc).__name__}: {exc})"
            )
    _without_ray(result, raw)
    if runs:
        result.tables.append(_setups_table(runs))
        result.charts.append(
            _timeline_chart(
                runs,
                "replicas",
                "autoscaling-replicas.png",
                "Running replicas around the load step",
                "running replicas",
            )
        )
        p95 = _timeline_chart(
            runs,
            "p95_ms",
            "autoscaling-p95.png",
            "p95 of the answers in each second around the load step",
            "p95 (ms)",
        )
        slo = runs[0].get("slo_ms")
        if slo is not None:
            p95.hlines["SLO"] = slo
        result.charts.append(p95)
    return result
