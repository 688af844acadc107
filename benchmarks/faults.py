"""Faults and overload, measured: ``python -m benchmarks.faults``.

Two scenarios against ``loom serve`` with the bundled embedding model on 2 replicas, each
written to one JSON file (``benchmarks/results/faults-<time>.json`` unless ``--out``):

- **replica killed under load**: closed-loop users (``--kill-concurrency``, 32) send one
  text per request; after ``--warmup-s`` and ``--before-s`` one replica's process gets
  SIGKILL (a crash, not a shutdown); the load goes on for ``--after-s``. Figures: failed
  requests over the whole run (goal 0), their kinds, p99 before the kill and in the window
  after it, their ratio, and the calls the gateway sent again (``loom_retries_total``).
- **overload at 3 x capacity**: capacity is the closed-loop throughput at c=64 and the
  unloaded p99 that of c=1; then open-loop arrivals (Poisson, seeded) at ``--overload-x``
  (3) x capacity for ``--overload-s``. Figures: the share answered 503 (shed), the share
  failed otherwise (goal 0), the accepted requests' p99 over the unloaded p99 (goal <= 2),
  and the resident memory of the gateway and the replicas before and after (goal: within
  10 %).

A third, **``loom serve`` SIGKILLed with jobs queued and running** (``--scenarios restart``,
not in the default run), starts a server of its own with training on: ``benchmarks.restart``.

Every request's start, end and outcome is kept, so the windows are cut after the run. The
load generator is this package's raw HTTP/1.1 client (``benchmarks.loadgen``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.corpus import request_bodies, take_cycled
from benchmarks.embeddings import say, warn_if_busy
from benchmarks.loadgen import (
    LOCALHOST,
    NS_PER_S,
    ProtocolError,
    RawHttpConnection,
    build_requests,
    event_loop_factory,
)
from benchmarks.machine import machine_facts
from benchmarks.processes import ServerProcess, ServerSpec
from benchmarks.report import latency_ms
from benchmarks.restart import add_restart_args, restart_scenario
from benchmarks.setups import EMBEDDINGS_PATH, stack_spec
from models.settings import LoomEnv
from serving.replicas.deployment import model_deployment_name
from serving.run_record import RunRecords, session_processes

REPO = Path(__file__).resolve().parents[1]
MODEL = "minilm"
REPLICA_MARK = f":{model_deployment_name(MODEL)}"
"""In the model's replica processes' titles: ``ray::ServeReplica:loom.minilm@1:model-minilm``."""
GATEWAY_MARK = "ServeReplica:loom:gateway"
"""In the gateway replica's process title (app ``loom``, deployment ``gateway``)."""
CONNECTION_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ProtocolError,
    ValueError,
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: when it started and ended (perf_counter ns) and how (a status code, or
    the name of the connection error)."""

    start_ns: int
    end_ns: int
    result: int | str

    @property
    def ok(self) -> bool:
        return self.result == 200


# ---- load -------------------------------------------------------------------------------------


STALE = (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)
"""What a request sent on a kept-alive connection meets when the server closed that
connection for idleness as the request went: no byte of an answer."""


async def _send(connection: RawHttpConnection, request: bytes) -> int | str:
    """Send on ``connection`` (reopened first if closed). A kept-alive connection that the
    server closed for idleness as this request went is a race every HTTP/1.1 client meets;
    like the OpenAI SDK, the request goes once more on a new connection (``stale_retries``
    counts it); a second failure is the outcome."""
    reused = connection.is_open
    try:
        await connection.reopen_if_closed()
        return await connection.send(request)
    except CONNECTION_ERRORS as exc:
        await connection.close()
        nothing_heard = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
        if not (reused and isinstance(exc, STALE) and nothing_heard):
            return type(exc).__name__
        STALE_RETRIES[0] += 1
    try:
        await connection.open()
        return await connection.send(request)
    except CONNECTION_ERRORS as exc:
        await connection.close()
        return type(exc).__name__


STALE_RETRIES = [0]
"""Requests sent once more after a kept-alive connection closed under them (this run)."""


async def closed_loop(
    port: int, requests: Sequence[bytes], concurrency: int, duration_s: float
) -> list[Outcome]:
    """``concurrency`` users, each sending its next request when the last is answered."""
    outcomes: list[Outcome] = []
    end_ns = time.perf_counter_ns() + int(duration_s * NS_PER_S)

    async def user(offset: int) -> None:
        connection = RawHttpConnection(LOCALHOST, port)
        index = offset
        try:
            while (start := time.perf_counter_ns()) < end_ns:
                result = await _send(connection, requests[index % len(requests)])
                outcomes.append(Outcome(start, time.perf_counter_ns(), result))
                if not isinstance(result, int):
                    await asyncio.sleep(0.05)  # a refused connection: no hot loop
                index += 1
        finally:
            await connection.close()

    await asyncio.gather(*(user(i * 7) for i in range(concurrency)))
    return outcomes


async def open_loop(
    port: int,
    requests: Sequence[bytes],
    rate_per_s: float,
    duration_s: float,
    *,
    max_connections: int,
    seed: int = 0,
    drain_timeout_s: float = 30.0,
) -> list[Outcome]:
    """Poisson arrivals at ``rate_per_s`` for ``duration_s``, whatever the answers: each goes
    on an idle keep-alive connection or a new one; past ``max_connections`` open at once an
    arrival is counted ``client_backlog`` (the server has fallen that far behind). Requests
    still unanswered ``drain_timeout_s`` after the last arrival count as ``unanswered``."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    idle: list[RawHttpConnection] = []
    in_flight: set[asyncio.Task[None]] = set()
    open_connections = 0

    async def one(request: bytes, start_ns: int) -> None:
        nonlocal open_connections
        connection = idle.pop() if idle else None
        if connection is None:
            connection = RawHttpConnection(LOCALHOST, port)
            open_connections += 1
        try:
            result = await _send(connection, request)
        except asyncio.CancelledError:
            outcomes.append(Outcome(start_ns, time.perf_counter_ns(), "unanswered"))
            await connection.close()
            raise
        outcomes.append(Outcome(start_ns, time.perf_counter_ns(), result))
        if connection.is_open:
            idle.append(connection)
        else:
            open_connections -= 1

    begin_ns = time.perf_counter_ns()
    end_ns = begin_ns + int(duration_s * NS_PER_S)
    due_ns = begin_ns
    index = 0
    while due_ns < end_ns:
        delay_s = (due_ns - time.perf_counter_ns()) / NS_PER_S
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if not idle and open_connections >= max_connections:
            outcomes.append(Outcome(due_ns, due_ns, "client_backlog"))
        else:
            task = asyncio.create_task(one(requests[index % len(requests)], due_ns))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        index += 1
        due_ns += int(rng.expovariate(rate_per_s) * NS_PER_S)
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for connection in idle:
        await connection.close()
    return outcomes


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coro)


# ---- the server's processes -------------------------------------------------------------------


def server_processes(mark: str, session_dir: str | None = None) -> list[psutil.Process]:
    """Ray processes whose title holds ``mark`` (Ray's workers are not below ``loom serve``
    in the process tree: the raylet starts them); with ``session_dir``, only that Ray
    session's, so another stack on the machine is never counted."""
    ours = None if session_dir is None else set(session_processes(session_dir))
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or ())
        if mark in cmdline and (ours is None or process.pid in ours):
            found.append(process)
    return found


def ray_session(spec: ServerSpec) -> str | None:
    """The Ray session of the server ``spec`` started, from its run record."""
    records = RunRecords(LoomEnv.from_environ({"LOOM_HOME": spec.env["LOOM_HOME"]}).run_dir)
    try:
        record = json.loads(records.path(spec.port).read_text())
    except (OSError, ValueError):
        return None
    session = record.get("ray_session_dir")
    return session if isinstance(session, str) else None


def metric_total(port: int, name: str) -> float:
    """The sum of a metric's samples on the gateway's ``/metrics`` and every monitoring
    sidecar's (the replicas' series), 0 when absent."""
    from serving.monitoring.scrape import scrape_sidecars, total

    url = f"http://{LOCALHOST}:{port}"
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return total(text, name) + total(scrape_sidecars(url), name)


def rss_mib(processes: Sequence[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / (1 << 20)


# ---- figures ----------------------------------------------------------------------------------


def summarise(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    kinds = Counter(str(o.result) for o in outcomes if not o.ok)
    latency = latency_ms([o.end_ns - o.start_ns for o in outcomes if o.ok])
    return {
        "requests": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "not_ok": dict(kinds),
        "p50_ms": latency.p50_ms,
        "p99_ms": latency.p99_ms,
    }


def overload_figures(
    loaded: dict[str, Any], unloaded: dict[str, Any], overload_s: float
) -> dict[str, Any]:
    """What an open-loop overload window shows (``summarise``'s of it and of the unloaded
    run): the share shed (503), the share failed otherwise, the accepted rate and the
    accepted p99 over the unloaded p99."""
    shed = loaded["not_ok"].get("503", 0)
    other = sum(n for kind, n in loaded["not_ok"].items() if kind != "503")
    return {
        "overloaded": loaded,
        "accepted_req_per_s": loaded["ok"] / overload_s,
        "shed_share": shed / max(1, loaded["requests"]),
        "failed_other_share": other / max(1, loaded["requests"]),
        "accepted_p99_over_unloaded_p99": ratio(loaded["p99_ms"], unloaded["p99_ms"]),
    }


def between(outcomes: Sequence[Outcome], start_ns: int, end_ns: int) -> list[Outcome]:
    """The requests that started in [start_ns, end_ns)."""
    return [o for o in outcomes if start_ns <= o.start_ns < end_ns]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def kill_scenario(port: int, server: ServerProcess, bodies: Sequence[bytes], args: Any) -> dict:
    requests = build_requests(LOCALHOST, port, EMBEDDINGS_PATH, bodies)
    session = ray_session(server.spec)
    replicas = server_processes(REPLICA_MARK, session)
    if len(replicas) < 2:
        raise RuntimeError(f"expected 2 replica processes of {MODEL}, found {len(replicas)}")
    victim = replicas[0]
    killed_ns: list[int] = []
    measured_from_ns: list[int] = []
    retries_before = metric_total(port, "loom_retries_total")

    total_s = args.warmup_s + args.before_s + args.after_s

    async def scenario() -> list[Outcome]:
        load = asyncio.create_task(closed_loop(port, requests, args.kill_concurrency, total_s))
        await asyncio.sleep(args.warmup_s)
        measured_from_ns.append(time.perf_counter_ns())
        await asyncio.sleep(args.before_s)
        killed_ns.append(time.perf_counter_ns())
        os.kill(victim.pid, signal.SIGKILL)
        say(f"kill: SIGKILL to replica pid {victim.pid} at {args.before_s:.0f} s")
        return await load

    outcomes: list[Outcome] = run(scenario())
    kill_ns = killed_ns[0]
    before = summarise(between(outcomes, measured_from_ns[0], kill_ns))
    after = summarise(between(outcomes, kill_ns, kill_ns + int(args.after_s * NS_PER_S)))
    failed = sum(not o.ok for o in outcomes)
    kinds = dict(Counter(str(o.result) for o in outcomes if not o.ok))
    result = {
        "concurrency": args.kill_concurrency,
        "before_s": args.before_s,
        "after_s": args.after_s,
        "failed_requests": failed,
        "before": before,
        "after_kill": after,
        "p99_after_over_before": ratio(after["p99_ms"], before["p99_ms"]),
        "replicas_after": len(server_processes(REPLICA_MARK, session)),
        "gateway_retries": metric_total(port, "loom_retries_total") - retries_before,
    }
    say(
        f"kill: {failed} failed of {len(outcomes)} {kinds}; "
        f"p99 before {before['p99_ms']:.1f} ms, after the kill {after['p99_ms']:.1f} ms; "
        f"{result['gateway_retries']:.0f} calls sent again by the gateway"
    )
    return result


def overload_scenario(port: int, server: ServerProcess, bodies: Sequence[bytes], args: Any) -> dict:
    requests = build_requests(LOCALHOST, port, EMBEDDINGS_PATH, bodies)
    unloaded = summarise(run(closed_loop(port, requests, 1, args.measure_s)))
    saturated = summarise(run(closed_loop(port, requests, 64, args.measure_s)))
    # a tight wait budget sheds the closed loop too: then give the capacity measured without
    capacity = args.capacity or saturated["ok"] / args.measure_s
    say(
        f"overload: unloaded p99 {unloaded['p99_ms']:.1f} ms; capacity {capacity:.0f} req/s "
        f"(closed loop c=64, p99 {saturated['p99_ms']:.1f} ms)"
    )
    session = ray_session(server.spec)
    gateway = server_processes(GATEWAY_MARK, session)
    replicas = server_processes(REPLICA_MARK, session)
    rss_before = {"gateway": rss_mib(gateway), "replicas": rss_mib(replicas)}
    rate = args.overload_x * capacity
    say(
        f"overload: open loop at {rate:.0f} req/s ({args.overload_x:g} x) for {args.overload_s:g} s"
    )
    stale_before = STALE_RETRIES[0]
    timeline: list[dict[str, float]] = []

    async def overload() -> list[Outcome]:
        load = asyncio.create_task(
            open_loop(port, requests, rate, args.overload_s, max_connections=args.max_connections)
        )
        began = time.monotonic()
        while not load.done():  # RSS over time: a leak grows on, a high-water mark levels off
            await asyncio.wait([load], timeout=args.rss_every_s)
            sample = {"gateway": rss_mib(gateway), "replicas": rss_mib(replicas)}
            timeline.append({"t_s": round(time.monotonic() - began, 1), **sample})
        return await load

    outcomes = run(overload())
    rss_after = {"gateway": rss_mib(gateway), "replicas": rss_mib(replicas)}
    time.sleep(args.settle_s)  # the load's connections closed, then once more
    rss_settled = {"gateway": rss_mib(gateway), "replicas": rss_mib(replicas)}
    loaded = summarise(outcomes) | {"stale_connection_retries": STALE_RETRIES[0] - stale_before}
    result = {
        "unloaded": unloaded,
        "saturated_closed_loop_c64": saturated,
        "capacity_req_per_s": capacity,
        "offered_req_per_s": rate,
        "overload_s": args.overload_s,
        **overload_figures(loaded, unloaded, args.overload_s),
        "rss_mib_before": rss_before,
        "rss_mib_after": rss_after,
        "rss_after_over_before": {
            k: ratio(rss_after[k], rss_before[k]) for k in ("gateway", "replicas")
        },
        "rss_mib_settled": rss_settled,
        "rss_timeline": timeline,
    }
    say(
        f"overload: {loaded['requests']} arrivals, {result['shed_share']:.1%} shed (503), "
        f"{result['failed_other_share']:.1%} failed otherwise {loaded['not_ok']}; accepted "
        f"{result['accepted_req_per_s']:.0f} req/s, p99 {loaded['p99_ms'] or float('nan'):.1f} ms "
        f"= {result['accepted_p99_over_unloaded_p99'] or float('nan'):.2f} x unloaded; RSS "
        f"gateway {rss_before['gateway']:.0f} -> {rss_after['gateway']:.0f} MiB, replicas "
        f"{rss_before['replicas']:.0f} -> {rss_after['replicas']:.0f} MiB; over time "
        + ", ".join(f"{p['t_s']:.0f}s {p['gateway']:.0f}/{p['replicas']:.0f}" for p in timeline)
    )
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios", default="kill,overload", help="kill, overload, restart (comma-separated)"
    )
    parser.add_argument("--kill-concurrency", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=5.0, help="load before measuring")
    parser.add_argument("--before-s", type=float, default=20.0, help="load before the kill")
    parser.add_argument("--after-s", type=float, default=60.0, help="load after the kill")
    parser.add_argument("--measure-s", type=float, default=15.0, help="capacity and unloaded")
    parser.add_argument(
        "--capacity", type=float, default=None,
        help="req/s to take as capacity instead of measuring it (c=64 closed loop)",
    )  # fmt: skip
    parser.add_argument("--overload-x", type=float, default=3.0, help="offered / capacity")
    parser.add_argument("--overload-s", type=float, default=60.0, help="300 for issue 12's 5 min")
    parser.add_argument("--max-connections", type=int, default=1024)
    parser.add_argument("--rss-every-s", type=float, default=15.0, help="RSS sampled this often")
    parser.add_argument(
        "--settle-s", type=float, default=10.0, help="after the overload, before RSS once more"
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--model", action="append", default=[], metavar="FIELD=VALUE",
        help="override a field of the served model's config (JSON values), e.g. "
        'limits={"max_queue_wait_ms": 50}',
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="an environment variable for loom serve (and so Ray's processes), e.g. a Ray flag",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    add_restart_args(parser)
    return parser.parse_args(argv)


def model_overrides(pairs: Sequence[str], replicas: int) -> dict[str, Any]:
    overrides: dict[str, Any] = {"replicas": replicas}
    for pair in pairs:
        field, _, value = pair.partition("=")
        overrides[field] = json.loads(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    facts = machine_facts(REPO)
    warn_if_busy(facts)
    bodies = request_bodies(take_cycled(256), MODEL)
    results: dict[str, Any] = {"machine": facts, "args": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory(prefix="loom-bench-faults-") as tmp:
        for scenario in scenarios:
            if scenario == "restart":  # its own server: training on, killed and started again
                results["restart"] = restart_scenario(Path(tmp) / scenario, args)
                continue
            spec = stack_spec(
                work_dir=Path(tmp) / scenario,
                config_path=None,
                model_name=MODEL,
                extra_env=dict(pair.partition("=")[::2] for pair in args.env),
                ready_timeout_s=600.0,
                num_cpus=1,
                model_overrides=model_overrides(args.model, args.replicas),
            )
            with ServerProcess(spec) as server:
                say(f"{scenario}: loom serve ready in {server.ready_s:.1f} s")
                if scenario == "kill":
                    results["kill"] = kill_scenario(spec.port, server, bodies, args)
                elif scenario == "overload":
                    results["overload"] = overload_scenario(spec.port, server, bodies, args)
                else:
                    raise SystemExit(f"unknown scenario {scenario!r}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"faults-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
