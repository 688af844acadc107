"""Training throughput (issue 4): the ``lm`` trainer through the job system against a bare
single-process torch loop on the same model and data, and 1 against 2 workers, in one run.

    python -m benchmarks.training                  # ~6 min on 2 cores
    python -m benchmarks.training --quick          # a short smoke run
    python -m benchmarks.training --steps 600 --workers 1,2

The data are made once, the way the job makes them: the stdlib slice (``--corpus-mb``), split
and tokenised with the tokeniser trained on it. The bare loop (``train_single_process``, one
torch thread, as one worker reserving one CPU gets) trains on those files; each job trains on
its own pipeline's files, and the run checks they hold the same tokens (sha256).

Two figures per job, both samples/s = steps x global batch / seconds:
- ``stage``: the whole train stage as the job runs it (worker actors started, the group
  joined, the steps with their checkpoints and progress reports, evaluation, final save);
- ``loop``: the steps alone, timed inside rank 0.

Job overhead = 1 - job samples/s / bare samples/s, with W = 1, for each figure (goal <= 10%):
``loop`` is what the job system costs per sample; ``stage`` adds its fixed start-up cost
(about 10 s here, most of it Python imports in fresh worker processes), so it depends on how
long the job trains. The bare loop runs before and after the jobs, its mean the baseline;
each run records its loss at every step (``bare_loop.runs[i].loss``, ``[[step, loss], ...]``,
what ``loom bench`` draws as the loss curve). With ``--gpu`` and CUDA present, the ``small``
preset's bf16 tokens/s and model-FLOPs utilisation are measured too (bare loop; the GPU node
has no Ray). JSON goes to ``benchmarks/results/training-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.embeddings import say, warn_if_busy
from benchmarks.machine import machine_facts
from benchmarks.report import Target, target_record, write_json
from benchmarks.training_mfu import measure_lm_training, peak_bf16_flops
from training.trainers import lm

REPO = Path(__file__).resolve().parents[1]
OVERHEAD_GOAL = 0.10


@dataclass(frozen=True, kw_only=True)
class TrainBench:
    preset: str = "tiny"
    steps: int = 150
    seq_len: int = 128
    batch_size: int = 16
    """Global batch, sequences per step (each of W workers takes batch_size / W)."""
    corpus_mb: float = 2.0
    shards: int = 4
    vocab_size: int = 4096
    checkpoint_every_steps: int = 50
    learning_rate: float = 1e-3
    seed: int = 0


def job_spec(bench: TrainBench, workers: int, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "trainer": "lm",
        "dataset": "stdlib",
        "workers": workers,
        "resources": {"cpu": 1},
        "stage_workers": 2,
        "hyperparameters": {
            "preset": bench.preset,
            "max_steps": bench.steps,
            "seq_len": bench.seq_len,
            "batch_size": bench.batch_size,
            "max_corpus_mb": bench.corpus_mb,
            "shards": bench.shards,
            "vocab_size": bench.vocab_size,
            "checkpoint_every_steps": bench.checkpoint_every_steps,
            "learning_rate": bench.learning_rate,
            "seed": bench.seed,
        },
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(bench: TrainBench, folder: Path) -> dict[str, Any]:
    """Split, tokeniser and token files as the lm pipeline makes them (one process here)."""
    files = lm.corpus_files("stdlib", max_bytes=int(bench.corpus_mb * 1_000_000))
    plan = lm.plan_split(files, shards=bench.shards, seed=bench.seed)
    train_files = [Path(f) for shard in plan.train_shards for f in shard]
    lm.train_tokenizer(train_files, vocab_size=bench.vocab_size, out_dir=folder / "tokenizer")
    shard_paths = []
    for k, shard in enumerate(plan.train_shards):
        path = folder / "shards" / f"{k:05d}.npy"
        lm.tokenise_files(
            [Path(f) for f in shard], tokenizer_dir=folder / "tokenizer", out_path=path
        )
        shard_paths.append(path)
    train = folder / "train.npy"
    val = folder / "val.npy"
    tokens = lm.merge_token_files(shard_paths, train)
    lm.tokenise_files(
        [Path(f) for f in plan.val_files], tokenizer_dir=folder / "tokenizer", out_path=val
    )
    return {
        "train_tokens_path": train,
        "val_tokens_path": val,
        "train_tokens": tokens,
        "vocab_size": lm.tokenizer_vocab_size(folder / "tokenizer"),
        "train_sha256": sha256(train),
    }


def program_for(bench: TrainBench, data: dict[str, Any], *, preset: str | None = None) -> Any:
    return lm.LmTrainProgram.from_params(
        {
            "train_tokens": str(data["train_tokens_path"]),
            "val_tokens": str(data["val_tokens_path"]),
            "preset": preset or bench.preset,
            "vocab_size": data["vocab_size"],
            "seq_len": bench.seq_len,
            "batch_size": bench.batch_size,
            "max_steps": bench.steps,
            "learning_rate": bench.learning_rate,
            "seed": bench.seed,
        }
    )


def bare_loop(bench: TrainBench, data: dict[str, Any], *, threads: int) -> dict[str, Any]:
    """The plain loop: samples/s from building the model to the end of the last step, and its
    loss curve as ``[[steps_done, loss], ...]`` (steps counted from 1, as the job's progress
    reports count them)."""
    torch.set_num_threads(threads)
    program = program_for(bench, data)
    loss: list[list[float]] = []
    started = time.perf_counter()
    lm.train_single_process(program, on_step=lambda step, value: loss.append([step + 1, value]))
    total_s = time.perf_counter() - started
    samples = bench.steps * bench.batch_size
    return {
        "threads": threads,
        "steps": bench.steps,
        "seconds": total_s,
        "samples_per_s": samples / total_s,
        "tokens_per_s": samples * bench.seq_len / total_s,
        "loss": loss,
    }


def stage_seconds(events: list[Any], finished_at: float) -> dict[str, float]:
    """Seconds spent in each stage, from the job's running events (a stage lasts until the
    next event)."""
    spans: dict[str, float] = {}
    running = [e for e in events if e.type == "loom.job.running"]
    for event, following in zip(running, [*running[1:], None], strict=True):
        end = following.time if following is not None else finished_at
        spans[event.data["stage"]] = round(end - event.time, 3)
    return spans


def run_jobs(bench: TrainBench, workers: list[int], home: Path) -> list[dict[str, Any]]:
    import ray

    from training.db import create_db_engine, create_tables
    from training.jobs import JobState, JobStore
    from training.runner import RunnerSettings
    from training.scheduler import start_scheduler, stop_scheduler
    from training.spec import parse_job_spec
    from training.workspace import JobWorkspace

    settings = RunnerSettings(
        db_url=f"sqlite:///{home / 'loom.db'}",
        models_dir=str(home / "models"),
        jobs_dir=str(home / "jobs"),
    )
    engine = create_db_engine(settings.db_url)
    create_tables(engine)
    store = JobStore(engine)
    ray.init(
        num_cpus=max(workers),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"worker_niceness": 0},
    )
    scheduler = start_scheduler(settings, tick_s=0.2)
    results: list[dict[str, Any]] = []
    try:
        for w in workers:
            job = store.submit(parse_job_spec(job_spec(bench, w, f"bench-lm-w{w}")))
            scheduler.wake.remote()
            submitted = time.time()
            while store.get(job.id).state not in (
                JobState.SUCCEEDED,
                JobState.FAILED,
                JobState.CANCELLED,
            ):
                time.sleep(0.5)
            done = store.get(job.id)
            if done.state != JobState.SUCCEEDED:
                raise RuntimeError(f"job with {w} workers ended {done.state}: {done.error}")
            workspace = JobWorkspace(Path(settings.jobs_dir), job.id.value)
            metrics = done.metrics
            results.append(
                {
                    "workers": w,
                    "job_id": job.id.value,
                    "stage_samples_per_s": metrics["samples_per_s"],
                    "loop_samples_per_s": metrics["loop_samples_per_s"],
                    "train_stage_s": metrics["train_seconds"],
                    "job_wall_s": done.finished_at - submitted,
                    "stages_s": stage_seconds(store.events(done.id), done.finished_at),
                    "perplexity": metrics["perplexity"],
                    "train_sha256": sha256(workspace.train_tokens),
                }
            )
            r = results[-1]
            say(
                f"job W={w}: stage {r['stage_samples_per_s']:.1f} samples/s, loop "
                f"{r['loop_samples_per_s']:.1f} samples/s, train stage {r['train_stage_s']:.1f} s, "
                f"whole job {r['job_wall_s']:.1f} s, perplexity {r['perplexity']:.1f}"
            )
    finally:
        stop_scheduler(scheduler)
        ray.shutdown()
        engine.dispose()
    return results


def gpu_small_preset(bench: TrainBench, data: dict[str, Any], steps: int) -> dict[str, Any]:
    """The ``small`` preset's bf16 tokens/s and MFU on one GPU, bare loop; skipped without.
    The loop and the FLOPs estimate are ``benchmarks.training_mfu``'s (``benchmarks.gpu`` runs
    the same at a GPU-sized batch)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    program = program_for(bench, data, preset="small")
    run = measure_lm_training(program, device=torch.device("cuda"), steps=steps, bf16=True)
    peak = peak_bf16_flops(run.device_name)
    return {
        "device": run.device_name,
        "params": run.params,
        "tokens_per_s": run.tokens_per_s,
        "mfu": run.model_flops_per_s / peak[0] if peak else None,
        "peak_flops": peak[0] if peak else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workers", default="1,2", help="worker counts to run as jobs")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--gpu", action="store_true", help="also the small preset on CUDA")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    bench = TrainBench(steps=40, checkpoint_every_steps=20) if args.quick else TrainBench()
    if args.steps:
        bench = TrainBench(**{**asdict(bench), "steps": args.steps})
    workers = [int(w) for w in args.workers.split(",")]
    facts = machine_facts(REPO)
    warn_if_busy(facts)
    say(f"training benchmark: {bench}")
    with tempfile.TemporaryDirectory(prefix="loom-bench-train-") as tmp:
        home = Path(tmp)
        data = prepare_data(bench, home / "bare")
        say(f"data: {data['train_tokens']} training tokens, vocabulary {data['vocab_size']}")
        # the bare loop runs before and after the jobs, and their mean is the baseline, so a
        # machine that gets busier or quieter during the run moves both sides alike
        before = bare_loop(bench, data, threads=1)
        say(f"bare loop: {before['samples_per_s']:.1f} samples/s ({before['seconds']:.1f} s)")
        jobs = run_jobs(bench, workers, home / "jobs")
        after = bare_loop(bench, data, threads=1)
        say(f"bare loop: {after['samples_per_s']:.1f} samples/s ({after['seconds']:.1f} s)")
        bare = {
            "samples_per_s": (before["samples_per_s"] + after["samples_per_s"]) / 2,
            "runs": [before, after],
        }
        gpu = gpu_small_preset(bench, data, steps=50) if args.gpu else {"skipped": "not asked"}
    by_w = {j["workers"]: j for j in jobs}
    one = by_w.get(1)
    overhead = 1 - one["stage_samples_per_s"] / bare["samples_per_s"] if one else None
    loop_overhead = 1 - one["loop_samples_per_s"] / bare["samples_per_s"] if one else None
    same_data = all(j["train_sha256"] == data["train_sha256"] for j in jobs)
    speedup = (
        by_w[2]["stage_samples_per_s"] / by_w[1]["stage_samples_per_s"]
        if 1 in by_w and 2 in by_w
        else None
    )
    targets = [
        Target(
            name="job overhead per sample (W=1 steps, checkpoints and reports included)",
            value=loop_overhead,
            goal=OVERHEAD_GOAL,
            higher_is_better=False,
            formula="1 - job loop samples/s / bare loop samples/s",
        ),
        Target(
            name="job overhead with start-up (W=1 whole train stage)",
            value=overhead,
            goal=OVERHEAD_GOAL,
            higher_is_better=False,
            formula="1 - job stage samples/s / bare loop samples/s",
        ),
    ]
    # the stage's fixed cost: its seconds beyond the steps (workers started, imports, joining,
    # evaluation, final save); with it, the stage overhead falls to 10% once the steps take
    # fixed / 0.10 seconds
    fixed_s = (
        one["train_stage_s"]
        - one["train_stage_s"] * one["stage_samples_per_s"] / one["loop_samples_per_s"]
        if one
        else None
    )
    say(f"same tokens in the bare loop and every job: {same_data}")
    for target in targets:
        if target.value is not None:
            say(f"{target.name}: {target.value:.1%} (goal <= {target.goal:.0%}): {target.verdict}")
    if fixed_s is not None:
        say(f"train stage fixed cost: {fixed_s:.1f} s (workers, imports, joining, eval, save)")
    if speedup is not None:
        say(f"2 workers / 1 worker (train stage samples/s): {speedup:.2f}x")
    if "skipped" in gpu:
        say(f"GPU: skipped ({gpu['skipped']})")
    else:
        mfu = f"{gpu['mfu']:.1%}" if gpu["mfu"] is not None else "n/a (unknown peak)"
        say(f"GPU {gpu['device']}: small preset {gpu['tokens_per_s']:.0f} tokens/s, MFU {mfu}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"training-{stamp}.json"
    payload = {
        "benchmark": "training",
        "config": asdict(bench),
        "machine": facts,
        "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()},
        "bare_loop": bare,
        "jobs": jobs,
        "same_data": same_data,
        "overhead": overhead,
        "loop_overhead": loop_overhead,
        "speedup_2_over_1": speedup,
        "stage_fixed_s": fixed_s,
        "gpu": gpu,
        "targets": [target_record(target) for target in targets],
    }
    write_json(out, payload)
    say(f"wrote {out}")
    return 0 if same_data and all(t.passed is not False for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
