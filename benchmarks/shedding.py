"""Overload shedding designs side by side: ``python -m benchmarks.shedding``.

Issue 12 asks that at 3 x a model's capacity the accepted requests' p99 stays within 2 x
their unloaded p99. ``benchmarks.faults``' overload scenario measures one configuration; this
runs several, one after the other in one run, against the same offered load (3 x the
capacity of the first design, the defaults, unless ``--capacity``), so their figures compare
as ratios on the same noisy machine. Each design is a set of model config overrides (the
wait budget ``limits.max_queue_wait_ms``, which the gateway's coalescer and the replica's
admission both hold; the batch size ``batching.max_batch_size``):

- ``defaults``: a 1 s budget and batches of 64 (throughput first);
- ``budget-50ms``: a 50 ms budget, batches of 64;
- ``budget-20ms-batch-16`` and ``budget-10ms-batch-8``: tight budgets and small batches, so
  an accepted input waits at most one short batch behind the one running.

For each design: its unloaded p50/p99 (closed loop, c=1), its own capacity (closed loop,
c=64), then open-loop Poisson arrivals at the common offered rate: share shed (503), share
failed otherwise, accepted rate, accepted p99 / the design's unloaded p99, where the time
went (the gateway's mean handling time of accepted and shed requests together, the mean
batch size and engine time per batch from ``/metrics``, and the CPU cores the gateway, the
replicas and the load generator each used), and RSS before and after. JSON to
``benchmarks/results/shedding-<time>.json`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.corpus import request_bodies, take_cycled
from benchmarks.embeddings import say, warn_if_busy
from benchmarks.faults import (
    GATEWAY_MARK,
    MODEL,
    REPLICA_MARK,
    STALE_RETRIES,
    closed_loop,
    metric_total,
    open_loop,
    overload_figures,
    ray_session,
    rss_mib,
    run,
    server_processes,
    summarise,
)
from benchmarks.loadgen import LOCALHOST, build_requests
from benchmarks.machine import machine_facts
from benchmarks.processes import ServerProcess, ServerSpec
from benchmarks.setups import EMBEDDINGS_PATH, stack_spec

REPO = Path(__file__).resolve().parents[1]

DESIGNS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "budget-50ms": {"limits": {"max_queue_wait_ms": 50}},
    "budget-20ms-batch-16": {
        "limits": {"max_queue_wait_ms": 20},
        "batching": {"max_batch_size": 16},
    },
    "budget-10ms-batch-8": {
        "limits": {"max_queue_wait_ms": 10},
        "batching": {"max_batch_size": 8},
    },
}

SERVER_METRICS = (
    "loom_request_duration_seconds_sum",
    "loom_request_duration_seconds_count",
    "loom_batch_size_sum",
    "loom_batch_size_count",
    "loom_batch_duration_seconds_sum",
    "loom_batch_duration_seconds_count",
    "loom_rejected_total",
)


def server_metrics(port: int) -> dict[str, float]:
    return {name: metric_total(port, name) for name in SERVER_METRICS}


def per(after: dict[str, float], before: dict[str, float], name: str) -> float | None:
    """The mean of a histogram over the window: its sum's growth over its count's."""
    count = after[f"{name}_count"] - before[f"{name}_count"]
    return None if count <= 0 else (after[f"{name}_sum"] - before[f"{name}_sum"]) / count


def where_time_went(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    gateway_s = per(after, before, "loom_request_duration_seconds")
    batch_s = per(after, before, "loom_batch_duration_seconds")
    return {
        "gateway_mean_ms_all_answers": None if gateway_s is None else gateway_s * 1000,
        "mean_batch_size": per(after, before, "loom_batch_size"),
        "mean_batch_ms": None if batch_s is None else batch_s * 1000,
        "inputs_rejected": after["loom_rejected_total"] - before["loom_rejected_total"],
    }


def cpu_s(processes: Sequence[psutil.Process]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def design_run(
    spec: ServerSpec, bodies: Sequence[bytes], offered_per_s: float | None, args: Any
) -> dict[str, Any]:
    """One design's figures; ``offered_per_s`` None: 3 x this design's own capacity."""
    port = spec.port
    requests = build_requests(LOCALHOST, port, EMBEDDINGS_PATH, bodies)
    unloaded = summarise(run(closed_loop(port, requests, 1, args.measure_s)))
    saturated = summarise(run(closed_loop(port, requests, 64, args.measure_s)))
    capacity = saturated["ok"] / args.measure_s
    rate = offered_per_s if offered_per_s is not None else args.overload_x * capacity
    session = ray_session(spec)
    gateway = server_processes(GATEWAY_MARK, session)
    replicas = server_processes(REPLICA_MARK, session)
    rss_before = {"gateway": rss_mib(gateway), "replicas": rss_mib(replicas)}
    metrics_before = server_metrics(port)
    parts = {"gateway": gateway, "replicas": replicas, "load_generator": [psutil.Process()]}
    cpu_before = {part: cpu_s(processes) for part, processes in parts.items()}
    started = time.perf_counter()
    stale_before = STALE_RETRIES[0]
    outcomes = run(
        open_loop(port, requests, rate, args.overload_s, max_connections=args.max_connections)
    )
    elapsed_s = time.perf_counter() - started
    cpu_cores = {
        part: (cpu_s(processes) - cpu_before[part]) / elapsed_s for part, processes in parts.items()
    }
    breakdown = where_time_went(metrics_before, server_metrics(port)) | {
        "cpu_cores_used": cpu_cores
    }
    rss_after = {"gateway": rss_mib(gateway), "replicas": rss_mib(replicas)}
    loaded = summarise(outcomes) | {"stale_connection_retries": STALE_RETRIES[0] - stale_before}
    return {
        "unloaded": unloaded,
        "own_capacity_req_per_s": capacity,
        "saturated_closed_loop_c64": saturated,
        "offered_req_per_s": rate,
        **overload_figures(loaded, unloaded, args.overload_s),
        "where_time_went": breakdown,
        "rss_mib_before": rss_before,
        "rss_mib_after": rss_after,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--designs", default=",".join(DESIGNS), help=f"comma-separated, of {', '.join(DESIGNS)}"
    )
    parser.add_argument("--measure-s", type=float, default=10.0, help="unloaded and capacity")
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--overload-x", type=float, default=3.0, help="offered / capacity")
    parser.add_argument(
        "--capacity", type=float, default=None,
        help="req/s to take as capacity for every design (else the first design's, measured)",
    )  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=1024)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def summary_line(name: str, figures: dict[str, Any]) -> str:
    loaded, spent = figures["overloaded"], figures["where_time_went"]
    return (
        f"{name}: unloaded p99 {figures['unloaded']['p99_ms']:.1f} ms, own capacity "
        f"{figures['own_capacity_req_per_s']:.0f} req/s; at {figures['offered_req_per_s']:.0f} "
        f"req/s: {figures['shed_share']:.1%} shed, {figures['failed_other_share']:.1%} other "
        f"{loaded['not_ok']}, accepted {figures['accepted_req_per_s']:.0f} req/s at p99 "
        f"{loaded['p99_ms'] or float('nan'):.1f} ms = "
        f"{figures['accepted_p99_over_unloaded_p99'] or float('nan'):.1f} x unloaded; "
        f"batches {spent['mean_batch_size'] or 0:.1f} inputs / "
        f"{spent['mean_batch_ms'] or 0:.1f} ms; CPU cores used: "
        + ", ".join(f"{part} {cores:.2f}" for part, cores in spent["cpu_cores_used"].items())
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name.strip() for name in args.designs.split(",") if name.strip()]
    unknown = [name for name in names if name not in DESIGNS]
    if unknown:
        raise SystemExit(f"unknown designs {unknown}; known: {', '.join(DESIGNS)}")
    facts = machine_facts(REPO)
    warn_if_busy(facts)
    bodies = request_bodies(take_cycled(256), MODEL)
    results: dict[str, Any] = {"machine": facts, "args": vars(args) | {"out": str(args.out)}}
    designs: dict[str, Any] = {}
    offered = None if args.capacity is None else args.overload_x * args.capacity
    with tempfile.TemporaryDirectory(prefix="loom-bench-shedding-") as tmp:
        for name in names:
            spec = stack_spec(
                work_dir=Path(tmp) / name,
                config_path=None,
                model_name=MODEL,
                extra_env={},
                ready_timeout_s=600.0,
                num_cpus=1,
                model_overrides={"replicas": args.replicas, **DESIGNS[name]},
            )
            with ServerProcess(spec) as server:
                say(f"{name}: loom serve ready in {server.ready_s:.1f} s")
                figures = design_run(spec, bodies, offered, args)
            offered = figures["offered_req_per_s"]  # the first design's sets the rest's
            designs[name] = {"overrides": DESIGNS[name], **figures}
            say(summary_line(name, figures))
    results["designs"] = designs
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"shedding-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
