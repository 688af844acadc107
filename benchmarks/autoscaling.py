"""Autoscaling and the control plane, measured: ``python -m benchmarks.autoscaling``.

Side by side in one run, on one local Ray, each set-up a Loom server of its own serving a
small classifier whose replicas hold their engine ``--engine-ms`` per call (so one replica
clears a known rate, and ``--callers`` closed-loop callers queue behind it):

- ``loom-sidecars``: Loom's policy reading the sidecars directly;
- ``loom-prometheus``: the same policy reading a real Prometheus that scrapes the sidecars
  through ``/v1/admin/targets`` (skipped without the ``prometheus`` binary);
- ``serve-policy``: Ray Serve's built-in policy (``autoscaling.policy: serve``) on the same
  bounds, delays and target (requests in flight per replica at the handles).

Each with ``--upscale-delay-s`` (1 s: "delays set for the benchmark"). Figures per set-up:

- reaction: seconds from the load step to the new replica serving traffic (the sidecar shows
  a second replica with inputs computed), and to the count decided; goal <= 15 s;
- the p95 of the requests answered during the step against ``--slo-ms``;
- the sidecar's CPU (cores) under the same load for ``--steady-s``: these replicas mostly
  wait (their engine time is a sleep), so the share of their CPU is not the goal's measure;

then the sidecar's CPU as a share of the replicas' on a model that computes (the bundled
MiniLM on 2 replicas under ``--callers`` callers, its policy reading the sidecar every
second); goal <= 2 %.

Then, without Ray: the policy's cost per decision (``LoomAutoscalingPolicy.__call__`` and the
pure ``decide``, microseconds), and the control plane's failover: two contenders on one
SQLite job store, the holder silenced (no release: its lease must lapse), seconds until the
standby's take-over runs, with the default timings (15/10/2 s) and fast ones (6/4/1 s).

JSON to ``benchmarks/results/autoscaling-<time>.json`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.machine import machine_facts
from benchmarks.processes import free_port
from benchmarks.report import latency_ms, write_json

REPO = Path(__file__).resolve().parents[1]
MODEL = "scaled"
SETUPS = ("loom-sidecars", "loom-prometheus", "serve-policy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autoscaling")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated set-ups")
    parser.add_argument("--callers", type=int, default=12, help="closed-loop callers")
    parser.add_argument("--engine-ms", type=float, default=40.0, help="engine time per call")
    parser.add_argument("--upscale-delay-s", type=float, default=1.0)
    parser.add_argument("--target-queue-depth", type=float, default=3.0)
    parser.add_argument("--slo-ms", type=float, default=500.0, help="the latency SLO (p95)")
    parser.add_argument("--steady-s", type=float, default=20.0, help="the CPU window")
    parser.add_argument("--decisions", type=int, default=20_000, help="policy calls timed")
    parser.add_argument("--skip-failover", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true", help="no MiniLM CPU-share phase")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


# ---- the load ---------------------------------------------------------------------------------


def digits_body() -> dict[str, Any]:
    """One v2 infer request for ``MODEL``: a row of 64 pixels."""
    rows = np.random.default_rng(0).uniform(0, 16, size=(1, 64)).astype(np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    return {"inputs": [tensor | {"data": rows.ravel().tolist()}]}


class ClosedLoop:
    """``callers`` closed-loop callers POSTing ``body`` to ``path``, each sending again once
    answered; every answer's (end time, latency, status) kept, a transport error as status 0.

        with ClosedLoop(url, 12, f"/v2/models/{MODEL}/infer", digits_body()) as load:
            ...
        load.statuses          # {200: 1443}
    """

    def __init__(self, url: str, callers: int, path: str, body: dict[str, Any]) -> None:
        self.url, self.callers, self.path, self.body = url, callers, path, body
        self.answers: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.callers)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:

            async def caller() -> None:
                while not self._stop.is_set():
                    started = time.monotonic()
                    try:
                        status = (await client.post(self.path, json=self.body)).status_code
                    except httpx.HTTPError:
                        status = 0
                    ended = time.monotonic()
                    self.answers.append((ended, ended - started, status))

            await asyncio.gather(*(caller() for _ in range(self.callers)))

    @property
    def statuses(self) -> dict[int, int]:
        """Answers by HTTP status (0: the transport failed)."""
        counts: dict[int, int] = {}
        for _, _, status in self.answers:
            counts[status] = counts.get(status, 0) + 1
        return counts

    def start(self) -> float:
        self._thread.start()
        return time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)

    def __enter__(self) -> ClosedLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- one set-up -------------------------------------------------------------------------------


def sidecar_view(url: str) -> dict[str, float]:
    """Replicas that have computed inputs, the desired count, and CPU seconds so far."""
    from prometheus_client.parser import text_string_to_metric_families

    from serving.monitoring.scrape import scrape_sidecars

    serving: set[str] = set()
    view = {"desired": 0.0, "sidecar_cpu_s": 0.0, "replica_cpu_s": 0.0}
    for family in text_string_to_metric_families(scrape_sidecars(url)):
        for s in family.samples:
            if s.name == "loom_inputs_total" and s.labels.get("model") == MODEL and s.value > 0:
                serving.add(s.labels["replica"])
            elif s.name == "loom_autoscaler_desired_replicas":
                view["desired"] = max(view["desired"], s.value)
            elif s.name == "loom_sidecar_cpu_seconds_total":
                view["sidecar_cpu_s"] += s.value
            elif s.name == "loom_replica_cpu_seconds_total" and s.labels.get("kind") == "rows":
                view["replica_cpu_s"] += s.value
    view["serving"] = float(len(serving))
    return view


def running_replicas(url: str) -> int:
    status = httpx.get(f"{url}/v1/status", timeout=30).json()
    return int(status["deployments"][f"model-{MODEL}"]["running_replicas"])


def wait_for(condition: Callable[[], bool], deadline_s: float = 300.0) -> float | None:
    """Seconds until ``condition()`` held; None past the deadline."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline_s:
            return None
        time.sleep(0.2)
    return time.monotonic() - started


def start_prometheus(work: Path, gateway_port: int) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    assert binary is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "loom",
                "http_sd_configs": [
                    {"url": f"http://127.0.0.1:{gateway_port}/v1/admin/targets",
                     "refresh_interval": "2s"}
                ],
            }
        ],
    }  # fmt: skip
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def register_classifier(store: Any, folder: Path) -> None:
    """A digits MLP (random weights: only its speed matters here) as ``MODEL`` version 1."""
    import torch

    from models.engines.classify import save_family_model
    from models.families.digits import DigitsConfig, build_digits

    torch.manual_seed(0)
    config = DigitsConfig(arch="mlp", hidden=32)
    save_family_model(build_digits(config).eval(), config, folder)
    store.register(MODEL, folder, task="classify")


class ReplicaTimeline:
    """Samples the running replica count every ``every_s`` on a thread of its own, for the
    replicas-over-time chart: ``(monotonic time, running replicas)`` pairs; a failed read is
    skipped (the server is busy, not down)."""

    def __init__(self, url: str, every_s: float = 0.5) -> None:
        self.url, self.every_s = url, every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            # a sample the controller could not answer is a gap in the chart, not an error
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                self.samples.append((time.monotonic(), running_replicas(self.url)))
            self._stop.wait(self.every_s)

    def __enter__(self) -> ReplicaTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def timeline(
    samples: Sequence[tuple[float, int]],
    answers: Sequence[tuple[float, float, int]],
    step: float,
    bucket_s: float = 1.0,
) -> dict[str, list[list[float]]]:
    """Replicas and the answered requests' p95 over time, seconds from the load step: the
    replica samples as they are, the p95 of the successful answers ending in each
    ``bucket_s`` window (at the window's end)."""
    replicas = [[round(at - step, 3), float(count)] for at, count in samples]
    buckets: dict[int, list[int]] = {}
    for end, seconds, status in answers:
        if status == 200:
            buckets.setdefault(int((end - step) // bucket_s), []).append(int(seconds * 1e9))
    p95 = [
        [(index + 1) * bucket_s, latency_ms(values).p95_ms or 0.0]
        for index, values in sorted(buckets.items())
    ]
    return {"replicas": replicas, "p95_ms": p95}


def run_setup(setup: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from models.settings import LoomEnv
    from models.store import ModelStore
    from serving.config import parse_config
    from serving.server import LoomServer

    port = free_port()
    env = LoomEnv.from_environ({"LOOM_HOME": str(work / "home")})
    register_classifier(ModelStore(env.models_dir), work / "model")
    monitoring: dict[str, Any] = {"stats_interval_s": 0.5, "poll_interval_s": 0.5}
    prometheus = None
    if setup == "loom-prometheus":
        prometheus, prom_url = start_prometheus(work, port)
        monitoring |= {"prometheus_url": prom_url, "rate_window_s": 3}
    else:
        monitoring |= {"rate_window_s": 2}
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_queue_depth": args.target_queue_depth,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": 600,  # the steady window holds two replicas
        "policy": "serve" if setup == "serve-policy" else "loom",
    }
    model = {
        "name": MODEL, "source": MODEL, "task": "classify", "num_cpus": 0.25,
        "torch_threads": 1, "autoscaling": autoscaling, "limits": {"max_queue_wait_ms": None},
        "faults": {"delay_ms": args.engine_ms, "delay_probability": 1.0,
                   "delay_scope": "replica"},
    }  # fmt: skip
    config = parse_config(
        {"training": {"enabled": False}, "server": {"port": port}, "monitoring": monitoring,
         "models": [model]}
    )  # fmt: skip
    loom = LoomServer(config, env)
    url = f"http://127.0.0.1:{port}"
    try:
        loom.start(ready_timeout_s=300)
        load = ClosedLoop(url, args.callers, f"/v2/models/{MODEL}/infer", digits_body())
        for _ in range(3):  # warm: the first calls load caches
            httpx.post(f"{url}/v2/models/{MODEL}/infer", json=load.body, timeout=60)
        wait_for(lambda: sidecar_view(url)["serving"] >= 1, 60)
        with ReplicaTimeline(url) as replicas_seen:
            time.sleep(1.0)  # a second of the count before the step
            step = load.start()
            decided_s = wait_for(lambda: running_replicas(url) >= 2)
            serving_s = wait_for(lambda: sidecar_view(url)["serving"] >= 2)
            reaction_s = None if serving_s is None else time.monotonic() - step
            step_end = time.monotonic()
            before = sidecar_view(url)
            time.sleep(args.steady_s)
            after = sidecar_view(url)
            load.stop()
    finally:
        loom.stop()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
    during = [lat * 1e9 for end, lat, status in load.answers if step <= end <= step_end]
    failed = sum(1 for _, _, status in load.answers if status != 200)
    p95 = latency_ms([int(x) for x in during]).p95_ms
    sidecar = after["sidecar_cpu_s"] - before["sidecar_cpu_s"]
    replicas = after["replica_cpu_s"] - before["replica_cpu_s"]
    result = {
        "setup": setup,
        "running_replicas_after_s": decided_s,
        "reaction_s": reaction_s,
        "reaction_goal_s": 15.0,
        "step_p95_ms": p95,
        "slo_ms": args.slo_ms,
        "step_p95_over_slo": None if p95 is None else p95 / args.slo_ms,
        "answers": len(load.answers),
        "failed": failed,
        "sidecar_cpu_share": None if replicas <= 0 else sidecar / replicas,
        "sidecar_cores": sidecar / args.steady_s,
        "steady_s": args.steady_s,
        "timeline": timeline(replicas_seen.samples, load.answers, step),
    }
    share = result["sidecar_cpu_share"]
    print(
        f"{setup:16s} reaction {_s(reaction_s)} (replica running after {_s(decided_s)}), "
        f"step p95 {_ms(p95)} vs SLO {args.slo_ms:.0f} ms, sidecar CPU "
        f"{'-' if share is None else f'{100 * share:.2f} %'} of the replicas', "
        f"{failed} of {len(load.answers)} failed",
        flush=True,
    )
    return result


def cpu_share(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The sidecar's CPU against the replicas' under load on a model that computes: the
    bundled MiniLM on 2 replicas, autoscaled between 2 and 2 so its policy reads the sidecar
    every second (the default ``monitoring.poll_interval_s``), ``--callers`` closed-loop
    callers for ``--steady-s``."""
    from models.settings import LoomEnv
    from serving.config import parse_config
    from serving.server import LoomServer

    port = free_port()
    env = LoomEnv.from_environ({"LOOM_HOME": str(work / "home")})
    model = {
        "name": "minilm", "source": "minilm", "task": "embed", "num_cpus": 0.5,
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "limits": {"max_queue_wait_ms": None},
    }  # fmt: skip
    config = parse_config(
        {"training": {"enabled": False}, "server": {"port": port}, "models": [model]}
    )
    loom = LoomServer(config, env)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "minilm", "input": "a sentence of a few words about serving models"}
    try:
        loom.start(ready_timeout_s=300)
        with ClosedLoop(url, args.callers, "/v1/embeddings", body):
            time.sleep(5)  # warm: both replicas busy
            before, started = sidecar_view(url), time.monotonic()
            time.sleep(args.steady_s)
            after, elapsed = sidecar_view(url), time.monotonic() - started
    finally:
        loom.stop()
    sidecar = after["sidecar_cpu_s"] - before["sidecar_cpu_s"]
    replicas = after["replica_cpu_s"] - before["replica_cpu_s"]
    result = {
        "model": "minilm x 2 replicas",
        "sidecar_cpu_share": sidecar / replicas if replicas > 0 else None,
        "sidecar_cores": sidecar / elapsed,
        "replica_cores": replicas / elapsed,
        "goal": 0.02,
        "steady_s": elapsed,
    }
    print(
        f"sidecar CPU under MiniLM load: {100 * sidecar / max(replicas, 1e-9):.2f} % of the "
        f"replicas' ({sidecar / elapsed:.4f} cores against {replicas / elapsed:.2f})",
        flush=True,
    )
    return result


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


# ---- without Ray ------------------------------------------------------------------------------


def policy_cost(decisions: int, work: Path) -> dict[str, float]:
    """Microseconds per decision: the Serve adapter (context -> signals -> decide -> state)
    and the pure decision alone."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    from serving.autoscaling import pollers, ray_policy
    from serving.autoscaling.policy import Limits, Signal, WindowState, decide
    from serving.autoscaling.readings import Reading
    from serving.config.sections import AutoscalingConfig

    config = AutoscalingConfig(max_replicas=8, latency_slo_ms=200)
    options = ray_policy.autoscaling_config(
        MODEL, "embed", config, pollers.Source(stats_dir=str(work / "stats"))
    )
    policy = ray_policy.LoomAutoscalingPolicy(**options["policy"].policy_kwargs)
    reading = Reading(app=f"loom.{MODEL}@1", at_s=time.time(), queue_depth=9.0,
                      latency_p95_ms=120.0)  # fmt: skip

    class Fixed:
        def latest(self, app: str) -> Reading:
            return reading

    policy.readings = Fixed()
    state: dict[str, Any] = {}

    def context() -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=DeploymentID(name=f"model-{MODEL}", app_name=f"loom.{MODEL}@1"),
            deployment_name=f"model-{MODEL}", app_name=f"loom.{MODEL}@1",
            current_num_replicas=2, target_num_replicas=2, running_replicas=[],
            total_num_requests=9.0, total_queued_requests=0.0, aggregated_metrics={},
            raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8,
            policy_state=state, last_scale_up_time=None, last_scale_down_time=None,
            current_time=None, config=None,
        )  # fmt: skip

    started = time.perf_counter()
    for _ in range(decisions):
        _, state = policy(context())
    adapter_us = (time.perf_counter() - started) / decisions * 1e6
    limits = Limits(min_replicas=1, max_replicas=8)
    signals = [Signal("queue_depth", 4.5, 8.0, time.time())]
    window = WindowState()
    started = time.perf_counter()
    for _ in range(decisions):
        window = decide(2, signals, limits, window, now_s=time.time()).state
    decide_us = (time.perf_counter() - started) / decisions * 1e6
    print(f"policy cost: {adapter_us:.1f} us per Serve call, {decide_us:.1f} us per decide()")
    return {"adapter_us_per_call": adapter_us, "decide_us_per_call": decide_us}


def failover(work: Path, duration_s: float, deadline_s: float, retry_s: float) -> float:
    """Seconds from the holder's last renewal (silenced, not released) to the standby's
    take-over, two contenders on one SQLite job store."""
    from serving.config.control_plane import ControlPlaneConfig
    from serving.control_plane import ControlPlane
    from training.db import create_db_engine, create_tables
    from training.leases import LeaseStore

    engine = create_db_engine(f"sqlite:///{work / f'failover-{duration_s:g}.db'}")
    create_tables(engine)
    config = ControlPlaneConfig(
        lease_duration_s=duration_s, renew_deadline_s=deadline_s, retry_period_s=retry_s
    )
    took_over = threading.Event()
    holder = ControlPlane(config, LeaseStore(engine), take_over=lambda term: None,
                          step_down=lambda: None, holder="bench:1")  # fmt: skip
    standby = ControlPlane(config, LeaseStore(engine), take_over=lambda term: took_over.set(),
                           step_down=lambda: None, holder="bench:2")  # fmt: skip
    holder.start()
    wait_for(lambda: holder.role == "holder", 60)
    standby.start()
    wait_for(lambda: standby.role == "standby", 60)
    holder.elector.stop(release=False)  # its last renewal was at most retry_s ago
    silenced = time.monotonic()
    took_over.wait(timeout=duration_s * 4)
    seconds = time.monotonic() - silenced
    standby.stop()
    engine.dispose()
    print(f"failover with lease {duration_s:g} s / retry {retry_s:g} s: {seconds:.1f} s")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    results: dict[str, Any] = {"machine": machine_facts(REPO), "args": vars(args) | {
        "out": str(args.out)}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loom-bench-autoscaling-") as tmp:
        work = Path(tmp)
        results["policy_cost"] = policy_cost(args.decisions, work)
        if not args.skip_failover:
            results["failover_s"] = {
                "lease_15_renew_10_retry_2": failover(work, 15, 10, 2),
                "lease_6_renew_4_retry_1": failover(work, 6, 4, 1),
            }
        import ray

        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
        try:
            results["setups"] = []
            for setup in setups:
                if setup == "loom-prometheus" and shutil.which("prometheus") is None:
                    print("loom-prometheus: skipped (no prometheus binary)")
                    continue
                (work / setup).mkdir()
                results["setups"].append(run_setup(setup, work / setup, args))
            if not args.skip_cpu:
                (work / "cpu").mkdir()
                results["cpu_share"] = cpu_share(work / "cpu", args)
        finally:
            ray.shutdown()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"autoscaling-{stamp}.json"
    write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
