"""Embeddings, end to end: the engine alone, the whole Loom stack, Ray Serve alone and a plain
FastAPI server, measured in one run with one load generator, side by side.

    python -m benchmarks.embeddings                      # full run, ~5 minutes on 2 cores
    python -m benchmarks.embeddings --duration-s 5 --skip-stack
    python -m benchmarks.embeddings --env RAY_SERVE_THROUGHPUT_OPTIMIZED=1

Order: (0) the load generator against a no-op server; (a) the engine in this process at each
batch size; (b) ``loom serve`` in a subprocess at each concurrency level, with its batch-size
histogram read from its sidecars before and after each level's window; (c) one Ray Serve
deployment with ``@serve.batch`` behind HAProxy (``benchmarks.rayserve_server``) the same way;
(d) the plain server the same way. Every step prints one line with units; the end prints the
targets with PASS/MISS and writes everything to one JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.corpus import SENTENCES, request_bodies, take_cycled
from benchmarks.engine_sweep import SweepConfig, measure_batch_size
from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.machine import load_average_1m, machine_facts
from benchmarks.openloop import OpenLoadConfig, run_open_load
from benchmarks.options import (
    parse_env_assignments,
    parse_int_list,
    parse_variants,
    split_variant,
)
from benchmarks.processes import LOCALHOST, ServerNotReady, ServerProcess, ServerSpec
from benchmarks.report import (
    BatchSizes,
    BatchSummary,
    HistogramReading,
    LevelSummary,
    TargetGoals,
    batch_sizes_between,
    best_batch,
    evaluate_targets,
    format_batch_line,
    format_batch_sizes_line,
    format_hop_cost_line,
    format_level_line,
    format_target_line,
    hop_cost,
    latency_ms,
    summarise_level,
    target_record,
    write_json,
)
from benchmarks.setups import EMBEDDINGS_PATH, noop_spec, plain_spec, rayserve_spec, stack_spec

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class EmbeddingsBenchConfig:
    """One run of the embeddings benchmark."""

    duration_s: float = 15.0
    """Measured window per concurrency level."""
    warmup_s: float = 3.0
    """Load before each level's window opens, not recorded."""
    levels: tuple[int, ...] = (1, 8, 32, 64)
    """Concurrency levels (closed-loop virtual users) for the stack, Ray Serve and plain."""
    noop_concurrency: int = 64
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64, 128)
    engine_duration_s: float = 5.0
    """Measured time per batch size of the in-process engine sweep."""
    sentences: int = len(SENTENCES)
    """Distinct texts cycled through (the corpus repeats past its 64)."""
    model_name: str = "minilm"
    skip_stack: bool = False
    skip_rayserve: bool = False
    skip_plain: bool = False
    stack_config_path: Path | None = None
    """Serving YAML for the stack; ``None`` generates one for ``model_name``."""
    stack_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the stack's subprocess only (e.g. Ray Serve flags)."""
    stack_variants: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """More stacks to measure in the same run, each with its own extra environment and
    ``model.FIELD`` overrides of the generated config."""
    open_loop_shares: tuple[float, ...] = (0.5, 0.9)
    """After its closed-loop levels, each HTTP set-up gets Poisson arrivals offered at these
    shares of its own best closed-loop rate (``benchmarks.openloop``): latency with the
    queueing an open loop shows. Empty: none."""
    max_wait_ms: float = 10.0
    """The batching wait of the generated stack config and of the Ray Serve set-up's
    ``@serve.batch`` (the batch size of both is the engine's best)."""
    ready_timeout_s: float = 240.0
    out_path: Path = REPO_ROOT / "benchmarks" / "results" / "embeddings.json"

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.engine_duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("durations must be > 0 (warm-up >= 0)")
        if self.sentences < 1 or self.noop_concurrency < 1 or self.ready_timeout_s <= 0:
            raise ValueError("--sentences, --noop-concurrency, --ready-timeout-s must be > 0")
        if any(not 0 < share <= 2 for share in self.open_loop_shares):
            raise ValueError("--open-loop-shares are shares of capacity in (0, 2], e.g. 0.5,0.9")


def parse_args(argv: Sequence[str] | None) -> EmbeddingsBenchConfig:
    defaults = EmbeddingsBenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.embeddings", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s)
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s)
    parser.add_argument(
        "--levels", default=",".join(map(str, defaults.levels)), help="e.g. 1,8,32,64"
    )
    parser.add_argument(
        "--batch-sizes", default=",".join(map(str, defaults.batch_sizes)), help="engine sweep"
    )
    parser.add_argument("--engine-duration-s", type=float, default=defaults.engine_duration_s)
    parser.add_argument("--noop-concurrency", type=int, default=defaults.noop_concurrency)
    parser.add_argument("--sentences", type=int, default=defaults.sentences)
    parser.add_argument("--skip-stack", action="store_true")
    parser.add_argument("--skip-rayserve", action="store_true")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--config", type=Path, default=None, help="serving YAML for the stack")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for the stack subprocess (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
        help="also measure the stack with this environment (KEY=VALUE) or generated-config change "
        "(model.FIELD=VALUE), as setup stack:LABEL (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--open-loop-shares", default=",".join(f"{s:g}" for s in defaults.open_loop_shares),
        help="open-loop rates as shares of each set-up's closed-loop best, e.g. 0.5,0.9 "
        "('' for none)",
    )  # fmt: skip
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms)
    parser.add_argument("--ready-timeout-s", type=float, default=defaults.ready_timeout_s)
    parser.add_argument("--out", type=Path, default=defaults.out_path)
    args = parser.parse_args(argv)
    try:
        return EmbeddingsBenchConfig(
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            levels=parse_int_list(args.levels),
            noop_concurrency=args.noop_concurrency,
            batch_sizes=parse_int_list(args.batch_sizes),
            engine_duration_s=args.engine_duration_s,
            sentences=args.sentences,
            skip_stack=args.skip_stack,
            skip_rayserve=args.skip_rayserve,
            skip_plain=args.skip_plain,
            stack_config_path=args.config,
            stack_env=parse_env_assignments(args.env),
            stack_variants=parse_variants(args.variant),
            open_loop_shares=parse_shares(args.open_loop_shares),
            max_wait_ms=args.max_wait_ms,
            ready_timeout_s=args.ready_timeout_s,
            out_path=args.out,
        )
    except ValueError as exc:
        parser.error(str(exc))


def parse_shares(text: str) -> tuple[float, ...]:
    """``"0.5,0.9"`` -> (0.5, 0.9); ``""`` -> (); ``ValueError`` for anything not a number."""
    return tuple(float(part) for part in text.split(",") if part.strip())


def open_loop_rates(levels: Sequence[LevelSummary], shares: Sequence[float]) -> list[float]:
    """The offered rates of a set-up's open-loop levels: each share of its best closed-loop
    req/s (400 req/s best, shares 0.5 and 0.9: 200 and 360 req/s); none without a level
    that answered."""
    best = max((level.req_per_s for level in levels), default=0.0)
    return [share * best for share in shares] if best > 0 else []


def drive_open_levels(
    setup: str,
    server: ServerProcess,
    levels: Sequence[LevelSummary],
    bodies: Sequence[bytes],
    config: EmbeddingsBenchConfig,
) -> list[dict[str, Any]]:
    """Poisson arrivals at ``open_loop_rates`` against a ready server; each level's latency
    is from the request's scheduled arrival, so the client-side queue counts."""
    records = []
    for share, rate in zip(
        config.open_loop_shares, open_loop_rates(levels, config.open_loop_shares), strict=False
    ):
        if not server.is_running:
            raise RuntimeError(f"{setup} server exited during the open-loop levels")
        result = run_open_load(
            OpenLoadConfig(
                port=server.spec.port,
                path=EMBEDDINGS_PATH,
                rate_per_s=rate,
                warmup_s=config.warmup_s,
                duration_s=config.duration_s,
            ),
            bodies,
        )
        latency = latency_ms(result.latencies_ns)
        record = {
            "share": share,
            "offered_rate_per_s": result.offered_rate_per_s,
            "achieved_rate_per_s": result.achieved_rate_per_s,
            "requests": result.requests,
            "errors": result.errors,
            "p50_ms": latency.p50_ms,
            "p95_ms": latency.p95_ms,
            "p99_ms": latency.p99_ms,
            "max_connections": result.concurrency,
        }
        say(
            f"{setup:<6} open {share:.0%} of best: offered {record['offered_rate_per_s']:7.1f} "
            f"req/s, achieved {record['achieved_rate_per_s']:7.1f}, p50 "
            f"{_ms(latency.p50_ms)} p99 {_ms(latency.p99_ms)}, {result.errors} errors"
        )
        records.append(record)
    return records


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def say(line: str) -> None:
    print(line, flush=True)


def finish_run(
    results: dict[str, Any], out_path: Path, work_dir: Path, *, started: float, failed: bool
) -> None:
    """A module run's end, whatever happened: its wall time and the load at the end into
    ``results``, the JSON written, the work folder removed, or kept and named when the run
    failed (its server logs are in it)."""
    results["wall_s"] = time.monotonic() - started
    results["machine"]["load_avg_1m_end"] = load_average_1m()
    write_json(out_path, _jsonable(results))
    say(f"wrote {out_path}")
    if failed:
        say(f"work folder and server logs kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)


def warn_if_busy(facts: Mapping[str, Any]) -> None:
    """Say so when other work already keeps the CPUs busy: every figure will be noisy."""
    load, cpus = facts.get("load_avg_1m"), facts.get("cpus_usable") or facts.get("cpu_count")
    if load is not None and cpus and load > 0.5 * cpus:
        say(
            f"warning: load average {load:.1f} on {cpus} CPUs before the run; other work "
            f"shares this machine, so the figures will be noisy (torch's threads suffer most)"
        )


BATCH_SIZE_METRIC = "loom_batch_size"
SCRAPE_TIMEOUT_S = 5.0


def is_stack(setup: str) -> bool:
    """``stack`` and its variants ``stack:LABEL``: the set-ups with Loom's metrics."""
    return setup == "stack" or setup.startswith("stack:")


def batch_size_reading(text: str, model: str) -> HistogramReading:
    """``model``'s ``loom_batch_size`` histogram in Prometheus text, summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    cumulative: dict[float, float] = {}
    inputs = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == f"{BATCH_SIZE_METRIC}_bucket":
                le = float(sample.labels["le"])  # "+Inf" -> inf
                cumulative[le] = cumulative.get(le, 0.0) + sample.value
            elif sample.name == f"{BATCH_SIZE_METRIC}_sum":
                inputs += sample.value
    return HistogramReading(cumulative=cumulative, sum=inputs)


class BatchSizeWindow:
    """The stack's batch sizes over one level's measured window: its sidecars' metrics read
    as the window opens (a timer thread, ``opens_in_s`` after the load starts) and again
    after the level, then diffed. The sidecars are looked up before the load starts, so the
    window itself sees one small GET per sidecar at each end.

    A replica rewrites its stats every second, so each reading is up to 1 s old: the diff
    covers a stretch as long as the window, shifted up to 1 s earlier (still under load
    after the warm-up).

        window = BatchSizeWindow("http://127.0.0.1:8000", "minilm", opens_in_s=3.0)
        run_load(load, bodies)
        sizes = window.close()         # OSError/ValueError where a reading failed
    """

    def __init__(self, gateway_url: str, model: str, *, opens_in_s: float) -> None:
        from serving.monitoring.scrape import sidecar_urls

        self.model = model
        self.urls = sidecar_urls(gateway_url, timeout_s=SCRAPE_TIMEOUT_S)
        if not self.urls:
            raise ValueError("the gateway lists no monitoring sidecar")
        self._before: str | None = None
        self._failure: Exception | None = None
        self._timer = threading.Timer(opens_in_s, self._read_before)
        self._timer.daemon = True
        self._timer.start()

    def _fetch(self) -> str:
        from serving.monitoring.scrape import fetch_text

        return "".join(fetch_text(url, timeout_s=SCRAPE_TIMEOUT_S) for url in self.urls)

    def _read_before(self) -> None:
        try:
            self._before = self._fetch()
        except (OSError, ValueError) as exc:
            self._failure = exc

    def close(self) -> BatchSizes:
        self._timer.join()
        if self._before is None:
            raise self._failure or ValueError("no reading as the window opened")
        return batch_sizes_between(
            batch_size_reading(self._before, self.model),
            batch_size_reading(self._fetch(), self.model),
        )


def open_batch_size_window(
    setup: str, server: ServerProcess, concurrency: int, config: EmbeddingsBenchConfig
) -> BatchSizeWindow | None:
    """A window on the stack's batch sizes; None (with a line saying why) where the
    sidecars cannot be found: the level runs either way."""
    try:
        return BatchSizeWindow(
            f"http://{LOCALHOST}:{server.spec.port}", config.model_name, opens_in_s=config.warmup_s
        )
    except (OSError, ValueError) as exc:
        say(f"{setup:<6} c={concurrency:<3}: no batch-size histogram: sidecars not found ({exc})")
        return None


def close_batch_size_window(
    setup: str, window: BatchSizeWindow | None, concurrency: int
) -> BatchSizes | None:
    """The window's batch sizes; None (with a line saying why) where a reading failed."""
    if window is None:
        return None
    try:
        return window.close()
    except (OSError, ValueError) as exc:
        say(f"{setup:<6} c={concurrency:<3}: no batch-size histogram: {exc}")
        return None


def drive_levels(
    setup: str,
    server: ServerProcess,
    bodies: Sequence[bytes],
    levels: Sequence[int],
    config: EmbeddingsBenchConfig,
) -> list[LevelSummary]:
    """Run each concurrency level against a ready server; stop early if the server dies.
    A stack's levels also record its batch sizes over each window (``LevelSummary``)."""
    summaries = []
    for concurrency in levels:
        if not server.is_running:
            raise RuntimeError(
                f"{setup} server exited during the run\n--- stderr tail ---\n{server.stderr_tail()}"
            )
        load = LoadConfig(
            port=server.spec.port,
            path=EMBEDDINGS_PATH,
            concurrency=concurrency,
            warmup_s=config.warmup_s,
            duration_s=config.duration_s,
        )
        window = (
            open_batch_size_window(setup, server, concurrency, config) if is_stack(setup) else None
        )
        result = run_load(load, bodies)
        summary = summarise_level(
            concurrency=concurrency,
            duration_s=result.duration_s,
            requests=result.requests,
            errors=result.errors,
            latencies_ns=result.latencies_ns,
            texts_per_request=1,
            loadgen_cpu_s=result.loadgen_cpu_s,
            batch_sizes=close_batch_size_window(setup, window, concurrency),
        )
        say(format_level_line(setup, summary))
        if summary.batch_sizes is not None:
            say(format_batch_sizes_line(setup, concurrency, summary.batch_sizes))
        if result.error_kinds:
            say(f"{setup:<6} c={concurrency:<3}: errors by kind {result.error_kinds}")
        summaries.append(summary)
    return summaries


def run_http_setup(
    setup: str,
    spec: ServerSpec,
    measure: Callable[[ServerProcess], list[LevelSummary]],
    open_loop: Callable[[ServerProcess, list[LevelSummary]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Start the server, measure it (then its open-loop levels, given ``open_loop``), stop
    it; the record holds levels or the error."""
    record: dict[str, Any] = {"argv": list(spec.argv), "levels": [], "error": None}
    server = ServerProcess(spec)
    say(f"{setup:<6}: starting {' '.join(spec.argv[1:])}")
    try:
        with server:
            say(f"{setup:<6}: ready in {server.ready_s:.1f} s")
            record["levels"] = measure(server)
            if open_loop is not None:
                record["open_levels"] = open_loop(server, record["levels"])
    except (ServerNotReady, RuntimeError) as exc:
        record["error"] = str(exc)
        say(f"{setup:<6}: FAILED: {exc}")
    record["server"] = server.describe()
    if server.stop_record is not None:
        stop = server.stop_record
        say(
            f"{setup:<6}: stopped in {stop.stop_s:.1f} s, exit code {stop.exit_code}, "
            f"killed {stop.killed}, leftover processes reaped {stop.leftovers_killed}"
        )
    return record


def run_rayserve(
    bodies: Sequence[bytes], config: EmbeddingsBenchConfig, work_dir: Path, *, max_batch_size: int
) -> dict[str, Any]:
    """Ray Serve alone, laid out as the stack: one single-threaded replica per core, the
    engine's best batch size, the stack's batching wait. The record names the ingress that
    served (``haproxy``, or ``proxy`` where HAProxy failed), read from its ready answer."""
    spec = rayserve_spec(
        work_dir=work_dir,
        ready_timeout_s=config.ready_timeout_s,
        replicas=os.cpu_count() or 1,
        max_batch_size=max_batch_size,
        batch_wait_ms=config.max_wait_ms,
    )
    facts: dict[str, Any] = {}

    def measure(server: ServerProcess) -> list[LevelSummary]:
        facts.update(ready_answer(server.spec.ready_url))
        say(f"rayserve: ingress {facts.get('ingress')}")
        return drive_levels("rayserve", server, bodies, config.levels, config)

    record = run_http_setup(
        "rayserve",
        spec,
        measure,
        lambda server, levels: drive_open_levels("rayserve", server, levels, bodies, config),
    )
    record["ingress"] = facts.get("ingress")
    record["layout"] = {k: v for k, v in facts.items() if k not in ("ready", "ingress")}
    return record


def ready_answer(url: str) -> dict[str, Any]:
    """The JSON a ready server answers at ``url``; ``{}`` if it answers anything else."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=5.0) as answer:
            body = json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def run_engine_sweep(texts: Sequence[str], config: EmbeddingsBenchConfig) -> dict[str, Any]:
    """The engine in this process at every batch size; freed before the HTTP setups run."""
    from models.bundled import bundled_model_dir
    from models.engines.embed import EmbeddingEngine

    engine = EmbeddingEngine(bundled_model_dir())
    engine.load()
    engine.warmup()
    sweep_config = SweepConfig(
        batch_sizes=config.batch_sizes, duration_s_per_size=config.engine_duration_s
    )
    sweep: list[BatchSummary] = []
    for batch_size in config.batch_sizes:
        sweep.append(measure_batch_size(engine, texts, batch_size, sweep_config))
        say(format_batch_line(sweep[-1]))
    record = {"device": str(engine.device), "dtype": str(engine.dtype), "sweep": sweep}
    del engine
    gc.collect()
    return record


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    texts = take_cycled(config.sentences)
    bodies = request_bodies(texts, model=config.model_name)
    work_dir = Path(tempfile.mkdtemp(prefix="loom-bench-embeddings-"))
    failed = True  # until every part has run; a crash keeps the server logs
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "embeddings",
        "config": {k: _jsonable(v) for k, v in dataclasses.asdict(config).items()},
        "machine": machine_facts(REPO_ROOT),
    }
    warn_if_busy(results["machine"])
    try:
        noop = run_http_setup(
            "noop",
            noop_spec(work_dir=work_dir),
            lambda server: drive_levels("noop", server, bodies, (config.noop_concurrency,), config),
        )
        results["loadgen"] = {"client": "asyncio streams, HTTP/1.1 keep-alive", **noop}
        results["engine"] = run_engine_sweep(texts, config)
        setups: dict[str, Any] = {}
        best = best_batch(results["engine"]["sweep"])

        def open_loop(setup: str) -> Callable[[ServerProcess, list[LevelSummary]], list[Any]]:
            return lambda server, levels: drive_open_levels(setup, server, levels, bodies, config)

        stacks = {"stack": config.stack_env} | {
            f"stack:{label}": {**config.stack_env, **env}
            for label, env in config.stack_variants.items()
        }
        for name, assignments in ({} if config.skip_stack else stacks).items():
            env, model_overrides = split_variant(assignments)
            spec = stack_spec(
                work_dir=work_dir / name.replace(":", "-"),
                config_path=config.stack_config_path,
                model_name=config.model_name,
                extra_env=env,
                ready_timeout_s=config.ready_timeout_s,
                # the stack gets what the engine's best had: that batch size, every core
                max_batch_size=best.batch_size if best else 64,
                max_wait_ms=config.max_wait_ms,
                num_cpus=os.cpu_count() or 1,
                model_overrides=model_overrides,
            )

            def measure(server: ServerProcess, setup: str = name) -> list[LevelSummary]:
                return drive_levels(setup, server, bodies, config.levels, config)

            setups[name] = run_http_setup(name, spec, measure, open_loop(name))
            setups[name]["extra_env"] = dict(env)
            setups[name]["model_overrides"] = model_overrides
        if not config.skip_rayserve:
            setups["rayserve"] = run_rayserve(
                bodies,
                config,
                work_dir,
                max_batch_size=best.batch_size if best else 64,
            )
        if not config.skip_plain:
            spec = plain_spec(work_dir=work_dir, ready_timeout_s=config.ready_timeout_s)
            setups["plain"] = run_http_setup(
                "plain",
                spec,
                lambda s: drive_levels("plain", s, bodies, config.levels, config),
                open_loop("plain"),
            )
        results["setups"] = setups
        failed = any(record["error"] for record in (noop, *setups.values()))
        results.update(summarise(results))
    finally:
        finish_run(results, config.out_path, work_dir, started=started, failed=failed)
    return 1 if failed else 0


def summarise(results: Mapping[str, Any]) -> dict[str, Any]:
    """Targets and per-setup hop costs from the measured parts; prints the summary lines."""
    sweep: list[BatchSummary] = results["engine"]["sweep"]
    levels_by_setup = {name: record["levels"] for name, record in results["setups"].items()}
    noop_levels = results["loadgen"]["levels"]
    goals = TargetGoals()
    targets = evaluate_targets(
        engine=sweep,
        stack=levels_by_setup.get("stack", []),
        plain=levels_by_setup.get("plain", []),
        goals=goals,
    )
    costs = {
        name: hop_cost(sweep, levels, goals.high_concurrency, goals.low_concurrency)
        for name, levels in levels_by_setup.items()
    }
    best = best_batch(sweep)
    say("--- summary ---")
    if noop_levels:
        say(f"loadgen max (no-op server, c={noop_levels[0].concurrency}): "
            f"{noop_levels[0].req_per_s:.0f} req/s")  # fmt: skip
    if best is not None:
        say(f"engine best: {best.texts_per_s:.1f} texts/s at batch {best.batch_size}")
    batch_of_one = next((b for b in sweep if b.batch_size == 1), None)
    if batch_of_one is not None and batch_of_one.p50_ms is not None:
        say(f"engine batch-1 p50: {batch_of_one.p50_ms:.2f} ms")
    for name, cost in costs.items():
        say(format_hop_cost_line(name, cost))
    for target in targets:
        say(format_target_line(target))
    return {
        "engine_best": best,
        "hop_costs": costs,
        "targets": [target_record(t) for t in targets],
    }


def _jsonable(value: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON values, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
