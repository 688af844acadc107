"""The ensemble benchmark: what a scatter/gather costs over its slowest member, and what
hedging does to the tail when one member straggles.

Two ``loom serve`` runs of the same three trained digits members (2 replicas each), driven by
the same closed-loop load generator (``benchmarks.loadgen``) at the same concurrency:

1. clean: each member alone (v2 ``infer``, one row a request), then the ensemble ``digits``
   (mean of all three) -> ensemble p50/p99 against the slowest member's;
2. straggler: member 3 made 10 x slower than its p50 from run 1 on 5% of its calls (config
   ``faults``; ``--delay-scope call``, the default: the slow call alone waits;
   ``--delay-scope replica``: it holds its replica's engine thread, so the calls queued behind
   it wait too), then ``digits-unhedged`` and ``digits-hedged`` (hedge at the member's
   observed p95) -> hedged p99 against unhedged (goal: <= 0.5 x).

    python -m benchmarks.ensemble                 # ~6-8 minutes on 2 cores: concurrency 1 and 4
    python -m benchmarks.ensemble --duration-s 30 --concurrency 8

The target is read at the first level (concurrency 1: the pattern's own cost). At 4 on
2 cores the 3-way scatter keeps every core busy, so members queue behind each other and a
straggler's 10 x (of the member's p50 alone at that level) is a smaller step above the
ensemble's own latency: that level shows what saturation does.

Prints one line per figure with units; writes ``benchmarks/results/ensemble-<time>.json``.
On a shared machine compare the ratios: every figure of one run shares the same noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

from benchmarks.embeddings import say, warn_if_busy
from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.machine import machine_facts
from benchmarks.processes import LOCALHOST, ServerProcess, ServerSpec, child_env, free_port
from benchmarks.report import Target, latency_ms, target_record, write_json

REPO = Path(__file__).resolve().parents[1]
MEMBERS = ("digits-mlp", "digits-cnn", "digits-mlp2")
STRAGGLER = MEMBERS[2]
STRAGGLE_FACTOR = 10.0
STRAGGLE_PROBABILITY = 0.05
HEDGED_OVER_UNHEDGED_P99_GOAL = 0.5
ENSEMBLE_DEADLINE_MS = 30_000.0
"""Long enough that every member answers: the benchmark measures latency, not quorum."""


# ---- configs (pure) ---------------------------------------------------------------------------


def member_entries(faults: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """The three members, 2 single-threaded replicas each on half a logical CPU; ``faults``
    maps a member to its ``faults`` section."""
    faults = faults or {}
    return [
        {
            "name": name,
            "source": name,
            "task": "classify",
            "replicas": 2,
            "num_cpus": 0.5,
            "torch_threads": 1,
            **({"faults": dict(faults[name])} if name in faults else {}),
        }
        for name in MEMBERS
    ]


def ensemble_entry(name: str, **section: Any) -> dict:
    return {
        "name": name,
        "task": "classify",
        "ensemble": {
            "members": list(MEMBERS),
            "combine": "mean",
            "deadline_ms": ENSEMBLE_DEADLINE_MS,
            **section,
        },
    }


def straggler_faults(member_p50_ms: float, scope: str = "call") -> dict[str, float | str]:
    """Member 3's faults: 10 x its measured p50 on 5% of calls (12 ms p50 -> 120 ms), the
    call alone waiting (``call``) or its replica stalled (``replica``)."""
    return {
        "delay_ms": round(STRAGGLE_FACTOR * member_p50_ms, 1),
        "delay_probability": STRAGGLE_PROBABILITY,
        "delay_scope": scope,
    }


def clean_config(port: int) -> dict:
    return {
        "server": {"host": LOCALHOST, "port": port},
        "training": {"enabled": False},
        "models": [*member_entries(), ensemble_entry("digits")],
    }


def straggler_config(port: int, member_p50_ms: float, scope: str = "call") -> dict:
    """Member 3 straggling; the same ensemble without hedging, with hedging at the member's
    observed p95 (before 20 answers are seen: after 2 x its clean p50), and with a fixed
    hedge after 2 x its clean p50."""
    fixed = {"hedge_after_ms": round(2 * member_p50_ms, 1)}
    hedge = {"hedge_at_p95": True, **fixed}
    return {
        "server": {"host": LOCALHOST, "port": port},
        "training": {"enabled": False},
        "models": [
            *member_entries({STRAGGLER: straggler_faults(member_p50_ms, scope)}),
            ensemble_entry("digits-unhedged"),
            ensemble_entry("digits-hedged", **hedge),
            ensemble_entry("digits-hedged-fixed", **fixed),
        ],
    }


def infer_bodies(rows: np.ndarray) -> list[bytes]:
    """One v2 infer body per row (1 x 64 pixels)."""
    return [
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}
                ]
            }  # fmt: skip
        )
        for row in rows
    ]


# ---- the edges: members, servers, load ----------------------------------------------------------


def train_members(models_dir: Path, workdir: Path) -> dict[str, float]:
    """Three digits members in the store (seconds each); returns their validation accuracy."""
    import torch

    from models.store import ModelStore
    from training.spec import DigitsArch, DigitsHyperparameters
    from training.trainers.digits import export_digits, load_digits_split, train_digits_member

    split = load_digits_split(seed=0)
    store = ModelStore(models_dir)
    hp = DigitsHyperparameters(epochs=3, hidden=32, learning_rate=0.01)
    torch.set_num_threads(1)  # this process only trains; one thread is fastest on 2 cores
    accuracy = {}
    archs: tuple[DigitsArch, ...] = ("mlp", "cnn", "mlp")
    for name, arch, seed in zip(MEMBERS, archs, (0, 3, 2), strict=True):
        member = train_digits_member(arch, hp, split, seed=seed)
        store.register(name, export_digits(member, workdir / name), task="classify")
        accuracy[name] = member.metrics["val_accuracy"]
    return accuracy


def server_spec(name: str, config: dict, work_dir: Path, home: Path) -> ServerSpec:
    config_path = work_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = config["server"]["port"]
    return ServerSpec(
        name=name,
        argv=(sys.executable, "-m", "loom", "serve", "--config", str(config_path)),
        port=port,
        log_dir=work_dir / "logs",
        env=child_env({"LOOM_HOME": str(home), "PYTHONUNBUFFERED": "1"}),
        ready_timeout_s=600.0,
        stop_grace_s=60.0,
    )


def measure(
    port: int, model: str, bodies: Sequence[bytes], args: argparse.Namespace, concurrency: int
) -> dict[str, Any]:
    config = LoadConfig(
        port=port,
        path=f"/v2/models/{model}/infer",
        concurrency=concurrency,
        warmup_s=args.warmup_s,
        duration_s=args.duration_s,
    )
    result = run_load(config, bodies)
    latency = latency_ms(result.latencies_ns)
    figures = {
        "model": model,
        "requests": result.requests,
        "errors": result.errors,
        "error_kinds": result.error_kinds,
        "requests_per_s": result.requests / result.duration_s,
        **asdict(latency),
    }
    say(
        f"{model:<16} p50 {_ms(latency.p50_ms)}  p99 {_ms(latency.p99_ms)}  "
        f"{figures['requests_per_s']:.0f} req/s  errors {result.errors}"
    )
    return figures


def hedge_counts(port: int) -> dict[str, dict[str, float]]:
    """Hedges sent and won per ensemble, from the server's ``/metrics``."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    counts: dict[str, dict[str, float]] = {}
    for metric, key in (
        ("loom_ensemble_hedges_total", "sent"),
        ("loom_ensemble_hedge_wins_total", "won"),
    ):
        for ensemble, value in re.findall(
            rf'^{metric}{{ensemble="([^"]+)",[^}}]*}} (\S+)$', text, re.M
        ):
            counts.setdefault(ensemble, {"sent": 0.0, "won": 0.0})[key] += float(value)
    return counts


def _ms(value: float | None) -> str:
    return f"{value:7.1f} ms" if value is not None else "    n/a"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def level_ratios(level: dict[str, Any]) -> dict[str, float | None]:
    """One concurrency level's ratios: ensemble over its slowest member, hedged over not."""
    slowest = level["members_alone"][level["slowest_member"]]
    ensemble, unhedged = level["ensemble"], level["unhedged"]
    return {
        "ensemble_over_slowest_member_p50": _ratio(ensemble["p50_ms"], slowest["p50_ms"]),
        "ensemble_over_slowest_member_p99": _ratio(ensemble["p99_ms"], slowest["p99_ms"]),
        "hedged_over_unhedged_p99": _ratio(level["hedged"]["p99_ms"], unhedged["p99_ms"]),
        "hedged_fixed_over_unhedged_p99": _ratio(
            level["hedged_fixed"]["p99_ms"], unhedged["p99_ms"]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency",
        default="1,4",
        help="closed-loop users, one level or several (1,4); the first level is the target's",
    )
    parser.add_argument("--duration-s", type=float, default=15.0, help="measured window")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument(
        "--delay-scope",
        choices=("call", "replica"),
        default="call",
        help="the straggler's delay: the slow call alone (call) or its whole replica (replica)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    levels = [int(c) for c in str(args.concurrency).split(",")]
    facts = machine_facts(REPO)
    warn_if_busy(facts)
    bodies_rows = np.random.default_rng(0).uniform(0, 16, size=(64, 64)).astype(np.float32)
    bodies = infer_bodies(bodies_rows)
    results: dict[int, dict[str, Any]] = {c: {} for c in levels}
    with tempfile.TemporaryDirectory(prefix="loom-bench-ensemble-") as tmp:
        work = Path(tmp)
        home = work / "loom_home"
        accuracy = train_members(home / "models", work / "trained")
        say(f"members trained: {', '.join(f'{m} {a:.3f}' for m, a in accuracy.items())}")

        with ServerProcess(server_spec("clean", clean_config(free_port()), work, home)) as srv:
            for c in levels:
                say(f"-- concurrency {c}: each member alone, then the ensemble")
                alone = {m: measure(srv.spec.port, m, bodies, args, c) for m in MEMBERS}
                results[c]["members_alone"] = alone
                results[c]["ensemble"] = measure(srv.spec.port, "digits", bodies, args, c)
                slowest = max(alone, key=lambda m: alone[m]["p99_ms"] or 0.0)
                results[c]["slowest_member"] = slowest

        for c in levels:
            # "10 x slower": than the member's own p50 alone at this level
            straggler_p50 = results[c]["members_alone"][STRAGGLER]["p50_ms"]
            faults = straggler_faults(straggler_p50, args.delay_scope)
            say(
                f"-- concurrency {c}, straggler: {STRAGGLER} delayed {faults['delay_ms']:.1f} ms "
                f"(10 x its p50 {straggler_p50:.1f} ms) on {STRAGGLE_PROBABILITY:.0%} of calls, "
                f"scope {args.delay_scope}"
            )
            config = straggler_config(free_port(), straggler_p50, args.delay_scope)
            with ServerProcess(server_spec(f"straggler-{c}", config, work, home)) as srv:
                port = srv.spec.port
                results[c]["straggler_faults"] = faults
                results[c]["unhedged"] = measure(port, "digits-unhedged", bodies, args, c)
                results[c]["hedged"] = measure(port, "digits-hedged", bodies, args, c)
                results[c]["hedged_fixed"] = measure(port, "digits-hedged-fixed", bodies, args, c)
                results[c]["hedges"] = hedges = hedge_counts(port)
            for name, count in sorted(hedges.items()):
                say(f"{name}: {count['sent']:.0f} hedges sent, {count['won']:.0f} won")

    for c in levels:
        results[c]["ratios"] = ratios = level_ratios(results[c])
        say(
            f"c={c}: ensemble / slowest member ({results[c]['slowest_member']}): p50 "
            f"{ratios['ensemble_over_slowest_member_p50'] or float('nan'):.2f} x, p99 "
            f"{ratios['ensemble_over_slowest_member_p99'] or float('nan'):.2f} x; hedged at p95 "
            f"/ unhedged p99 {ratios['hedged_over_unhedged_p99'] or float('nan'):.2f} x; hedged "
            f"after 2 x p50 / unhedged p99 "
            f"{ratios['hedged_fixed_over_unhedged_p99'] or float('nan'):.2f} x"
        )
    first = levels[0]
    target = Target(
        name="hedged_over_unhedged_p99",
        value=results[first]["ratios"]["hedged_over_unhedged_p99"],
        goal=HEDGED_OVER_UNHEDGED_P99_GOAL,
        higher_is_better=False,
        formula=f"ensemble p99 with hedging at p95 / without, member 3 straggling, c={first}",
    )
    say(
        f"hedged at p95 / unhedged p99 at c={first}: {target.value or float('nan'):.2f} x "
        f"(goal <= {target.goal:g}): {target.verdict}"
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"ensemble-{stamp}.json"
    write_json(
        out,
        {
            "benchmark": "ensemble",
            "settings": {
                "concurrency": levels,
                "duration_s": args.duration_s,
                "warmup_s": args.warmup_s,
                "members": list(MEMBERS),
                "straggler": STRAGGLER,
                "delay_scope": args.delay_scope,
            },
            "machine": facts,
            "member_val_accuracy": accuracy,
            "levels": {str(c): results[c] for c in levels},
            "targets": [target_record(target)],
        },
    )
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
