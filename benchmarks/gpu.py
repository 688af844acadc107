"""The engines on one GPU node, without Ray: what an operator runs where only torch and
transformers are installed (``benchmarks/gpu_check.sh`` runs it and the GPU tests).

    python -m benchmarks.gpu --device cuda --out benchmarks/results/gpu-h100
    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu-cpu   # the code path, on a CPU

Parts, each printed as lines with units and written to ``OUT/gpu.json`` as soon as it ends (a
part that cannot run is recorded as ``skipped`` or ``error`` and the rest still run):

1. ``matmul``: the achieved TFLOP/s of large square matmuls per dtype (cuda: fp16, bf16, fp32
   and tf32 at n = 8192; cpu: fp32 at 1024): the ceiling the other parts are a share of.
2. ``embeddings``: the bundled MiniLM engine (``EmbeddingEngine.run``: tokenise, forward, pool,
   copy to the CPU) at batch sizes up to 1024: texts/s, batch latency, and the model FLOP/s as
   a share of that dtype's matmul ceiling. Model FLOPs of a batch of B texts padded to T tokens
   (``batch_flops``): ``2 N B T + 4 L H T^2 B``, N the parameters of the encoder's layer stack
   (embeddings, a lookup, and the pooler, one token per text, left out), L layers, H the width.
3. ``split``: with two or more GPUs, the same texts through the engine split across two devices
   (``models.parallel``) and on one: whether the vectors agree within a tolerance, and texts/s.
4. ``generation``: a random ~10 M-parameter GPT-2 (``benchmarks.generation_model``); tokens/s
   of sequential ``model.generate`` against the generation engine's continuous batching at a
   few closed-loop concurrencies.
5. ``training``: the ``lm`` trainer's ``small`` preset, bf16, tokens/s and MFU on CUDA (goal
   >= 40 % on H100/H200-class parts), eager and under ``torch.compile``; the ``tiny`` preset
   in fp32 on the CPU (``benchmarks.training_mfu``).

``OUT/result.json`` holds the same as one report ``Section`` (``sections``). Nothing here
imports Ray, FastAPI, uvicorn or Starlette (a unit test runs it with them blocked).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.generation_model import TinyGptSpec
from benchmarks.gpu_measure import (
    EmbedConfig,
    GenerateConfig,
    MatmulConfig,
    SplitConfig,
    TrainConfig,
    ceilings_tflops,
    error_text,
    free_memory,
    measure_split,
    run_embeddings,
    run_generation,
    run_matmul,
    run_training,
    say,
)
from benchmarks.gpu_report import RAW_FILE, RESULT_FILE, part_errors, sections
from benchmarks.machine import machine_facts, nvidia_smi, package_version
from benchmarks.report import write_json
from benchmarks.result import all_figures, as_json

__all__ = ["GpuBenchConfig", "cpu_config", "cuda_config", "main", "sections"]

REPO = Path(__file__).resolve().parents[1]
PARTS = ("matmul", "embeddings", "split", "generation", "training")


@dataclass(frozen=True, kw_only=True)
class GpuBenchConfig:
    """What each part measures and for how long; ``cuda_config``/``cpu_config`` build one."""

    device: str
    """``cuda`` (device 0; 0 and 1 for the split) or ``cpu``."""
    matmul: MatmulConfig
    embeddings: EmbedConfig
    split: SplitConfig
    generation: GenerateConfig
    training: TrainConfig

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device is cuda or cpu, not {self.device!r}")


def cuda_config(*, quick: bool = False) -> GpuBenchConfig:
    """An H100-sized run, ~3 minutes (torch.compile's first steps are most of the training
    part); ``quick``: the same code in about a minute, nothing compiled."""
    return GpuBenchConfig(
        device="cuda",
        matmul=MatmulConfig(
            size=4096 if quick else 8192,
            dtypes=("fp16", "bf16", "fp32", "tf32"),
            min_time_s=0.2 if quick else 1.0,
        ),
        embeddings=EmbedConfig(
            dtypes=("fp16", "bf16"),
            batch_sizes=(1, 32, 1024) if quick else (1, 8, 32, 128, 512, 1024),
            duration_s_per_size=0.5 if quick else 2.0,
        ),
        split=SplitConfig(
            dtypes=("fp32", "fp16"), batch_size=512, duration_s=0.5 if quick else 2.0
        ),
        generation=GenerateConfig(
            levels=(1, 16) if quick else (1, 8, 32, 64),
            min_requests=8 if quick else 16,
            sequential_requests=6 if quick else 24,
            mean_tokens=32 if quick else 64,
            prompt_tokens=(32, 64),
        ),
        training=TrainConfig(
            preset="small",
            seq_len=512,
            batch_size=128,  # 65,536 tokens a step: enough work per kernel to fill an H100
            steps=10 if quick else 40,
            bf16=True,
            compile=not quick,
        ),
    )


def cpu_config(*, quick: bool = False) -> GpuBenchConfig:
    """The same code on a CPU, sized for 2 cores: about a minute; ``quick`` ~20 s (a test)."""
    tiny_gpt = TinyGptSpec(
        n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=128, corpus_sentences=1500
    )
    return GpuBenchConfig(
        device="cpu",
        matmul=MatmulConfig(
            size=512 if quick else 1024, dtypes=("fp32",), min_time_s=0.2 if quick else 1.0
        ),
        embeddings=EmbedConfig(
            dtypes=("fp32",),
            batch_sizes=(1, 8) if quick else (1, 8, 32, 128),
            duration_s_per_size=0.3 if quick else 2.0,
        ),
        split=SplitConfig(dtypes=("fp32",), batch_size=32, duration_s=0.3 if quick else 1.0),
        generation=GenerateConfig(
            model=tiny_gpt if quick else TinyGptSpec(corpus_sentences=5000),
            levels=(1, 4) if quick else (1, 8),
            min_requests=6 if quick else 16,
            sequential_requests=4 if quick else 12,
            mean_tokens=8 if quick else 32,
            prompt_tokens=(8, 16) if quick else (32, 64),
        ),
        training=TrainConfig(
            preset="tiny",
            seq_len=128,
            batch_size=8,
            steps=3 if quick else 10,
            warmup_steps=1 if quick else 3,
            bf16=False,
            compile=False,
        ),
    )


# ---- facts, outputs, main ---------------------------------------------------------------------


def gpu_facts() -> dict[str, Any]:
    """torch's view of the GPUs (names, capability, memory), the driver, the versions."""
    available = torch.cuda.is_available()
    devices = []
    for index in range(torch.cuda.device_count() if available else 0):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    smi = nvidia_smi()
    return {
        "cuda_available": available,
        "device_count": len(devices),
        "devices": devices,
        "driver_version": smi[0]["driver_version"] if smi else None,
        "nvidia_smi": smi,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if available else None,
        "transformers": package_version("transformers"),
    }


def device_slug(facts: Mapping[str, Any], device: str) -> str:
    """``nvidia-h100-80gb-hbm3`` from the first GPU's name; ``cpu`` on the CPU."""
    if device != "cuda" or not facts.get("devices"):
        return "cpu" if device == "cpu" else "no-cuda"
    return re.sub(r"[^a-z0-9]+", "-", facts["devices"][0]["name"].lower()).strip("-")


def write_outputs(out: Path, raw: Mapping[str, Any]) -> None:
    """``gpu.json`` (the raw record) and ``result.json`` (the report section), both rewritten
    after every part so a run cut short still leaves what it measured."""
    write_json(out / RAW_FILE, as_json(raw))
    built = sections(raw)
    write_json(
        out / RESULT_FILE,
        as_json(
            {
                "command": raw["command"],
                "machine": raw["machine"],
                "figures": all_figures(built),
                "sections": built,
            }
        ),
    )


def run_part(
    name: str,
    config: GpuBenchConfig,
    parts: Mapping[str, Any],
    embedding_model_dir: Path | None,
    on_progress: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """One part's record; ``{"skipped": why}`` where this machine cannot run it. ``parts``:
    those run so far (the matmul ceilings are what the later parts are a share of);
    ``on_progress`` sees an unfinished record of a long part (training) as it grows."""
    if config.device == "cuda" and not torch.cuda.is_available():
        return {"skipped": f"CUDA is not available here (torch {torch.__version__})"}
    device = torch.device("cuda", 0) if config.device == "cuda" else torch.device("cpu")
    ceilings = ceilings_tflops(parts.get("matmul"))
    if name == "matmul":
        return run_matmul(config.matmul, device)
    if name == "generation":
        return run_generation(config.generation, device)
    if name == "training":
        record = run_training(config.training, device, ceilings, on_progress)
        if device.type != "cuda":
            skipped = {"preset": "small", "dtype": "bf16", "skipped": "needs CUDA"}
            record["runs"].insert(0, skipped)
        return record
    if name == "split":
        if device.type != "cuda":
            return {"skipped": "the split across two GPUs needs CUDA; this run is on the CPU"}
        if torch.cuda.device_count() < 2:
            return {"skipped": f"needs 2 CUDA devices; {torch.cuda.device_count()} here"}
    from models.bundled import bundled_model_dir
    from models.errors import StoreError

    try:
        model_dir = embedding_model_dir or bundled_model_dir()
    except StoreError as exc:
        return {"skipped": str(exc)}
    if name == "embeddings":
        return run_embeddings(config.embeddings, device, model_dir, ceilings)
    return measure_split(model_dir, ["cuda:0", "cuda:1"], config.split)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", type=Path, default=None, help="the run folder")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}"
    )
    parser.add_argument(
        "--embedding-model-dir",
        type=Path,
        default=None,
        help="an embedding model folder instead of the bundled MiniLM",
    )
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        parser.error(f"parts must be some of {','.join(PARTS)}, not {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts asked for; 0 unless one of them (or one measurement in it) failed."""
    args = parse_args(argv)
    config = (cuda_config if args.device == "cuda" else cpu_config)(quick=args.quick)
    facts = gpu_facts()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = (
        args.out
        or REPO / "benchmarks" / "results" / f"gpu-{device_slug(facts, args.device)}-{stamp}"
    )
    names = [d["name"] for d in facts["devices"]] or ["no CUDA device"]
    say(
        f"gpu benchmark on {args.device} ({', '.join(names)}; driver {facts['driver_version']}, "
        f"torch {facts['torch']}, CUDA {facts['torch_cuda']}), writing to {out}"
    )
    raw: dict[str, Any] = {
        "benchmark": "gpu",
        "command": ["python", "-m", "benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)],
        "device": args.device,
        "quick": args.quick,
        "config": dataclasses.asdict(config),
        "machine": {**machine_facts(REPO), "gpu": facts},
        "parts": {},
        "wall_s": 0.0,
    }
    started = time.perf_counter()
    for name in PARTS:
        if name not in args.parts:
            continue
        part_started = time.perf_counter()

        def keep_unfinished(record: dict[str, Any], name: str = name) -> None:
            raw["parts"][name] = {**record, "unfinished": True}
            write_outputs(out, raw)

        try:
            record = run_part(name, config, raw["parts"], args.embedding_model_dir, keep_unfinished)
        except Exception as exc:
            traceback.print_exc()
            record = {"error": error_text(exc)}
        free_memory()
        record["wall_s"] = round(time.perf_counter() - part_started, 2)
        raw["parts"][name] = record
        for key in ("skipped", "error"):
            if key in record:
                say(f"{name}: {key}: {record[key]}")
        raw["wall_s"] = round(time.perf_counter() - started, 2)
        write_outputs(out, raw)
    errors = part_errors(raw)
    say(f"wrote {out / RAW_FILE} and {out / RESULT_FILE} in {raw['wall_s']:.0f} s")
    for error in errors:
        say(f"error: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
