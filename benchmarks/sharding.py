"""The sharding benchmark: many small models under a per-replica model budget, served from one
pool replica, from the same pool on 4 replicas (Ray Serve's multiplexed routing alone), and
from 4 shards keyed by model name (the ring: each shard sees only its own members).

One ``loom serve`` holds the three set-ups side by side (each its own copies of the same
weights under its own names, so the load counters stay apart). For each, a warm pass asks every
model once, then a closed-loop load asks models drawn uniformly at random; the load counter
``loom_model_loads_total`` (a pool replica's multiplexing cache misses) is read before and
after the run.

    python -m benchmarks.sharding                  # ~4 minutes on 2 cores
    python -m benchmarks.sharding --models 32 --budget 8 --duration-s 30

Prints one line per set-up with units; writes ``benchmarks/results/sharding-<time>.json``.
On a shared machine compare the ratios: every figure of one run shares the same noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

from benchmarks.embeddings import say, warn_if_busy
from benchmarks.loadgen import LoadConfig, build_requests, run_requests
from benchmarks.machine import machine_facts
from benchmarks.processes import LOCALHOST, ServerProcess, ServerSpec, child_env, free_port
from benchmarks.report import Target, latency_ms, target_record, write_json

REPO = Path(__file__).resolve().parents[1]
SHARDS = 4
MISS_RATIO_GOAL = 0.1
"""4 shards should miss at most a tenth as often as 1 shard once warm (ours: none)."""


@dataclass(frozen=True)
class Setup:
    name: str
    """The pool's served name; its members are ``{prefix}-0`` .. ``{prefix}-{n-1}``."""
    prefix: str
    replicas: int
    shards: int | None


SETUPS = (
    Setup("one-shard", "one", replicas=1, shards=None),
    Setup("one-shard-4-replicas", "rep", replicas=SHARDS, shards=None),
    Setup("four-shards", "four", replicas=1, shards=SHARDS),
)


# ---- config and requests (pure) ---------------------------------------------------------------


def member_names(setup: Setup, models: int) -> list[str]:
    return [f"{setup.prefix}-{i}" for i in range(models)]


def pool_entry(setup: Setup, models: int, budget: int) -> dict[str, Any]:
    """One pool of ``models`` members holding at most ``budget`` per replica; single-threaded
    replicas on a quarter of a logical CPU (the machine has 2 cores for 9 replicas)."""
    entry: dict[str, Any] = {
        "name": setup.name,
        "task": "classify",
        "multiplex": {
            "models": [f"{n}@1" for n in member_names(setup, models)],
            "max_models_per_replica": budget,
        },
        "replicas": setup.replicas,
        "num_cpus": 0.25,
        "torch_threads": 1,
    }
    if setup.shards is not None:
        entry["sharding"] = {"shards": setup.shards, "key": "model"}
    return entry


def server_config(port: int, models: int, budget: int) -> dict[str, Any]:
    return {
        "server": {"host": LOCALHOST, "port": port},
        "training": {"enabled": False},
        "models": [pool_entry(s, models, budget) for s in SETUPS],
    }


def mixed_requests(
    port: int, names: Sequence[str], body: bytes, count: int, seed: int
) -> list[bytes]:
    """``count`` v2 infer requests, each to a model drawn uniformly from ``names``."""
    draw = random.Random(seed)
    return [
        build_requests(LOCALHOST, port, f"/v2/models/{draw.choice(names)}/infer", [body])[0]
        for _ in range(count)
    ]


def loads_by_model(metrics_text: str) -> dict[str, float]:
    """``loom_model_loads_total`` per member (summed over replicas) from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    loads: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "loom_model_loads_total" and "model" in sample.labels:
                model = sample.labels["model"]
                loads[model] = loads.get(model, 0.0) + sample.value
    return loads


def loads_of(loads: dict[str, float], names: Sequence[str]) -> float:
    return sum(loads.get(n, 0.0) for n in names)


# ---- the edges --------------------------------------------------------------------------------


def make_models(models_dir: Path, workdir: Path, models: int, hidden: int) -> None:
    """``models`` digits MLPs of distinct random weights, registered once per set-up."""
    import torch

    from models.engines.classify import save_family_model
    from models.families.digits import DigitsConfig, build_digits
    from models.store import ModelStore

    store = ModelStore(models_dir)
    config = DigitsConfig(arch="mlp", hidden=hidden)
    for i in range(models):
        torch.manual_seed(i)
        folder = workdir / f"digits-{i}"
        save_family_model(build_digits(config).eval(), config, folder)
        for setup in SETUPS:
            store.register(member_names(setup, models)[i], folder, task="classify")


def scrape_loads(port: int) -> dict[str, float]:
    """Loads so far, from the replicas' sidecars (a replica writes its stats every second:
    read after a second's pause, so the last requests' loads are in)."""
    from serving.monitoring.scrape import scrape_sidecars

    time.sleep(1.5)
    return loads_by_model(scrape_sidecars(f"http://{LOCALHOST}:{port}"))


def warm(port: int, names: Sequence[str], body: bytes) -> None:
    """Ask every model once, in order: each is loaded somewhere before the run."""
    for name in names:
        request = urllib.request.Request(
            f"http://{LOCALHOST}:{port}/v2/models/{name}/infer",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


def measure(port: int, setup: Setup, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    names = member_names(setup, args.models)
    warm(port, names, body)
    before = scrape_loads(port)
    config = LoadConfig(
        port=port,
        path=f"/v2/models/{setup.name}",  # for messages only: each request names its model
        concurrency=args.concurrency,
        warmup_s=args.warmup_s,
        duration_s=args.duration_s,
    )
    result = run_requests(config, mixed_requests(port, names, body, 20_000, seed=len(names)))
    after = scrape_loads(port)
    misses = loads_of(after, names) - loads_of(before, names)
    latency = latency_ms(result.latencies_ns)
    served = result.requests / result.duration_s
    # misses counted over warm-up and window: their requests
    total_requests = max(1, result.requests)
    figures = {
        "setup": asdict(setup),
        "requests": result.requests,
        "errors": result.errors,
        "error_kinds": result.error_kinds,
        "requests_per_s": served,
        "model_loads_during_run": misses,
        "loads_per_1000_requests": 1000 * misses / total_requests,
        "first_loads": loads_of(before, names),
        **asdict(latency),
    }
    say(
        f"{setup.name:<22} {served:7.1f} req/s  p50 {latency.p50_ms or 0:6.1f} ms  "
        f"p99 {latency.p99_ms or 0:7.1f} ms  model loads {misses:6.0f} "
        f"({figures['loads_per_1000_requests']:.1f} per 1000 requests)  errors {result.errors}"
    )
    return figures


def server_spec(config: dict, work_dir: Path, home: Path) -> ServerSpec:
    config_path = work_dir / "sharding.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return ServerSpec(
        name="sharding",
        argv=(sys.executable, "-m", "loom", "serve", "--config", str(config_path)),
        port=config["server"]["port"],
        log_dir=work_dir / "logs",
        env=child_env({"LOOM_HOME": str(home), "PYTHONUNBUFFERED": "1"}),
        ready_timeout_s=600.0,
        stop_grace_s=60.0,
    )


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=24, help="small models per set-up")
    parser.add_argument("--budget", type=int, default=8, help="models one replica may hold")
    parser.add_argument("--hidden", type=int, default=512, help="digits MLP width (~1 MB)")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop users")
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured window")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    facts = machine_facts(REPO)
    warn_if_busy(facts)
    row = np.random.default_rng(0).uniform(0, 16, size=(1, 64)).astype(np.float32)
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "data": row.ravel().tolist(),
                }
            ]
        }  # fmt: skip
    )
    with tempfile.TemporaryDirectory(prefix="loom-bench-sharding-") as tmp:
        work = Path(tmp)
        home = work / "loom_home"
        make_models(home / "models", work / "folders", args.models, args.hidden)
        config = server_config(free_port(), args.models, args.budget)
        with ServerProcess(server_spec(config, work, home)) as server:
            port = server.spec.port
            results = {s.name: measure(port, s, body, args) for s in SETUPS}

    one, replicas, four = (results[s.name] for s in SETUPS)
    ratios = {
        "four_shards_over_one_shard_requests_per_s": _ratio(
            four["requests_per_s"], one["requests_per_s"]
        ),
        "four_shards_over_four_replicas_requests_per_s": _ratio(
            four["requests_per_s"], replicas["requests_per_s"]
        ),
        "four_shards_over_one_shard_loads": _ratio(
            four["model_loads_during_run"], one["model_loads_during_run"]
        ),
    }
    target = Target(
        name="four_shards_over_one_shard_loads",
        value=ratios["four_shards_over_one_shard_loads"],
        goal=MISS_RATIO_GOAL,
        higher_is_better=False,
        formula="model loads during the run, 4 shards / 1 shard, same load",
    )
    say(
        f"4 shards / 1 shard: {ratios['four_shards_over_one_shard_requests_per_s'] or 0:.2f} x "
        f"requests/s, {target.value if target.value is not None else float('nan'):.3f} x "
        f"model loads (goal <= {MISS_RATIO_GOAL:g}): {target.verdict}; 4 shards / 1 shard x 4 "
        f"replicas: {ratios['four_shards_over_four_replicas_requests_per_s'] or 0:.2f} x "
        "requests/s"
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"sharding-{stamp}.json"
    write_json(
        out,
        {
            "benchmark": "sharding",
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": facts,
            "setups": results,
            "ratios": ratios,
            "targets": [target_record(target)],
        },
    )
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
