"""lm-evaluation-harness wall time on the repository's multiple-choice task (``loom_mc``):
``lm_eval --model local-completions`` against a Loom this module starts, vs lm-eval's
in-process ``hf`` model on the same weights, side by side in one run, with each side's
accuracy (they must be equal: the loglikelihoods agree).

    python -m benchmarks.evaluation                        # the generation benchmark's GPT-2
    python -m benchmarks.evaluation --model-dir $LOOM_HOME/models/my-lm/3 --repeats 3

The model is the generation benchmark's random ~10M-parameter GPT-2 unless ``--model-dir``
names a local transformers folder (a trained ``lm`` job's stored version, say): random
weights score at chance, and the figure is the time. Both sides get ``--threads`` torch
threads (Loom: one replica with that many; hf: ``OMP_NUM_THREADS``). The server is started
and ready before lm-eval is timed, as a user's would be; each side's time is lm-eval's whole
run (``wall_s``: imports, lm-eval's index of its built-in tasks, model or tokenizer loading,
scoring: what a user waits) and the part from building the model to the results written
(``evaluation_s``: what differs between the sides). Writes one JSON: both times per run,
their medians, the ratios Loom / hf (below 1: Loom was faster), and the accuracies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.embeddings import finish_run, say, warn_if_busy
from benchmarks.generation_model import TinyGptSpec, build_tiny_gpt, register_tiny_gpt
from benchmarks.lm_eval_runs import (
    MC_METRIC,
    MC_TASK,
    REPO_ROOT,
    LmEvalFailed,
    LmEvalModel,
    LmEvalRun,
    LoomEndpoint,
    hf_in_process,
    local_completions,
    offline_env,
    run_lm_eval,
)
from benchmarks.machine import machine_facts
from benchmarks.processes import ServerNotReady, ServerProcess
from benchmarks.setups import stack_spec

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MODEL_NAME = "lm-eval-model"


@dataclass(frozen=True, kw_only=True)
class LmEvalBenchConfig:
    model_dir: Path | None
    """A local transformers causal-LM folder; None: build the generation benchmark's GPT-2."""
    threads: int
    """Torch threads for each side: the Loom replica's, and the hf process's."""
    num_concurrent: int
    """lm-eval's requests in flight against Loom."""
    batch_size: int
    """Prompts per request to Loom, and hf's batch size."""
    max_sequences: int
    """The Loom replica's sequence slots (continuous batching)."""
    repeats: int
    """Runs of each side, alternated (Loom, hf, Loom, hf, ...); medians reported."""
    out_path: Path | None
    ready_timeout_s: float
    run_timeout_s: float


def parse_args(argv: Sequence[str] | None) -> LmEvalBenchConfig:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.evaluation",
        description="lm-eval wall time on loom_mc: local-completions against Loom vs hf",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="a local model folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for each side")
    parser.add_argument("--num-concurrent", type=int, default=8, help="requests in flight")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per request")
    parser.add_argument("--max-sequences", type=int, default=32, help="Loom's sequence slots")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--run-timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    for name in ("threads", "num_concurrent", "batch_size", "max_sequences", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return LmEvalBenchConfig(
        model_dir=args.model_dir,
        threads=args.threads,
        num_concurrent=args.num_concurrent,
        batch_size=args.batch_size,
        max_sequences=args.max_sequences,
        repeats=args.repeats,
        out_path=args.out,
        ready_timeout_s=args.ready_timeout_s,
        run_timeout_s=args.run_timeout_s,
    )


def serving_config(config: LmEvalBenchConfig) -> dict[str, Any]:
    """One replica of the model on ``threads`` CPUs; no job scheduler."""
    model = {
        "name": MODEL_NAME,
        "source": MODEL_NAME,
        "task": "generate",
        "replicas": 1,
        "num_cpus": config.threads,
        "torch_threads": config.threads,
        "generation": {"max_sequences": config.max_sequences},
    }
    return {"training": {"enabled": False}, "models": [model]}


def context_tokens(model_dir: Path) -> int:
    """The model's context (``n_positions`` of a GPT-2 config), what lm-eval truncates to."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 1024)


def run_record(run: LmEvalRun) -> dict[str, Any]:
    return {
        "wall_s": run.wall_s,
        "evaluation_s": run.evaluation_s,
        "accuracy": run.metric(MC_TASK, MC_METRIC),
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per side and Loom's over hf's (``< 1``: Loom finished first)."""
    figures: dict[str, Any] = {}
    for side, records in runs.items():
        for key in ("wall_s", "evaluation_s"):
            figures[f"{side}_{key}"] = statistics.median(r[key] for r in records)
        figures[f"{side}_accuracy"] = records[0]["accuracy"]
    for key in ("wall_s", "evaluation_s"):
        figures[f"loom_over_hf_{key}"] = figures[f"loom_{key}"] / figures[f"hf_{key}"]
    figures["accuracy_equal"] = figures["loom_accuracy"] == figures["hf_accuracy"]
    return figures


def time_side(model: LmEvalModel, work: Path, env: dict[str, str], timeout_s: float) -> LmEvalRun:
    return run_lm_eval(model, tasks=(MC_TASK,), output_dir=work, env=env, timeout_s=timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    now = dt.datetime.now(dt.UTC)
    out_path = config.out_path or RESULTS_DIR / f"lm-eval-{now:%Y%m%dT%H%M%SZ}.json"
    work_dir = Path(tempfile.mkdtemp(prefix="loom-bench-lm-eval-"))
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "evaluation",
        "task": MC_TASK,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "machine": machine_facts(REPO_ROOT),
        "runs": {"loom": [], "hf": []},
        "error": None,
    }
    warn_if_busy(results["machine"])
    try:
        source = config.model_dir
        if source is None:
            source = work_dir / "model-source"
            results["parameters"] = build_tiny_gpt(source, TinyGptSpec())
        spec = stack_spec(
            work_dir=work_dir, config_path=work_dir / "stack.yaml", model_name=MODEL_NAME,
            extra_env={}, ready_timeout_s=config.ready_timeout_s,
        )  # fmt: skip
        (work_dir / "stack.yaml").write_text(yaml.safe_dump(serving_config(config)))
        stored = register_tiny_gpt(Path(spec.env["LOOM_HOME"]), source, name=MODEL_NAME)
        endpoint = LoomEndpoint(
            url=f"http://127.0.0.1:{spec.port}", model=MODEL_NAME, tokenizer_dir=stored,
            num_concurrent=config.num_concurrent, batch_size=config.batch_size,
            max_length_tokens=context_tokens(stored), timeout_s=int(config.run_timeout_s),
        )  # fmt: skip
        sides = {
            "loom": (local_completions(endpoint), "1"),  # the client's torch idles
            "hf": (hf_in_process(stored, batch_size=config.batch_size), str(config.threads)),
        }
        with ServerProcess(spec) as server:
            say(f"loom: ready in {server.ready_s:.1f} s")
            for repeat in range(config.repeats):
                for side, (model, omp_threads) in sides.items():
                    work = work_dir / f"{side}-{repeat}"
                    env = offline_env(work / "hf", api_key=None) | {"OMP_NUM_THREADS": omp_threads}
                    run = time_side(model, work, env, config.run_timeout_s)
                    record = run_record(run)
                    results["runs"][side].append(record)
                    say(
                        f"{side:<4} run {repeat}: {record['wall_s']:.1f} s wall, "
                        f"{record['evaluation_s']:.1f} s evaluating, acc {record['accuracy']:.3f}"
                    )
        results["figures"] = figures = summarise(results["runs"])
        say(
            f"lm-eval {MC_TASK}: loom {figures['loom_wall_s']:.1f} s, hf "
            f"{figures['hf_wall_s']:.1f} s wall (loom/hf {figures['loom_over_hf_wall_s']:.2f}x); "
            f"acc loom {figures['loom_accuracy']:.3f} hf {figures['hf_accuracy']:.3f}"
        )
    except (LmEvalFailed, ServerNotReady, OSError) as exc:
        results["error"] = str(exc)
        say(f"FAILED: {exc}")
    finally:
        failed = results["error"] is not None
        finish_run(results, out_path, work_dir, started=started, failed=failed)
    return 1 if results["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
