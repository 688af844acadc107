"""The measurements of a GPU run (``benchmarks.gpu``), one function per part, each taking its
own typed config section and a device, returning a JSON-ready record and printing one line
with units per measurement. A measurement that fails is recorded (``{"error": ...}``) beside
the others, never raised; nothing here imports Ray or an HTTP stack.

    matmul = run_matmul(MatmulConfig(size=1024, dtypes=("fp32",), min_time_s=1.0), cpu)
    ceilings = {r["dtype"]: r["tflops"] for r in matmul["results"] if "tflops" in r}
    embeddings = run_embeddings(EmbedConfig(...), cpu, bundled_model_dir(), ceilings)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import queue
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.corpus import SENTENCES, take_cycled
from benchmarks.engine_sweep import BatchRunner, SweepConfig, batch_at, measure_batch_size
from benchmarks.generation_model import GenerationRequest, TinyGptSpec
from benchmarks.generation_report import RequestTiming, tokens_in_window
from benchmarks.report import latency_ms

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "tf32": torch.float32,
}
"""Short dtype names (JSON and figure names) -> torch; ``tf32`` is fp32 with TF32 matmuls."""
ENGINE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
"""Short names -> the dtype text the engines take (``models.device``)."""
SPLIT_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
"""Largest |difference| allowed between a split model's unit vectors and one device's: fp32
rounding (~1e-7 a step over 6 layers), or a few ulps of a 0.1-sized component in half
precision (fp16 ~6e-5, bf16 ~5e-4), with room for kernels that sum in another order."""


def _check_dtypes(dtypes: Sequence[str], allowed: Iterable[str]) -> None:
    unknown = set(dtypes) - set(allowed)
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be some of {sorted(allowed)}, not {list(dtypes)}")


@dataclass(frozen=True, kw_only=True)
class MatmulConfig:
    size: int
    """n of the n x n @ n x n matmuls: 2 n^3 FLOPs each."""
    dtypes: tuple[str, ...]
    """Of ``TORCH_DTYPES``."""
    min_time_s: float
    """Timed seconds per dtype, after three warm-up matmuls."""

    def __post_init__(self) -> None:
        _check_dtypes(self.dtypes, TORCH_DTYPES)


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    dtypes: tuple[str, ...]
    """Of ``ENGINE_DTYPES``."""
    batch_sizes: tuple[int, ...]
    duration_s_per_size: float
    """Timed seconds per batch size, after three warm-up batches."""

    def __post_init__(self) -> None:
        _check_dtypes(self.dtypes, ENGINE_DTYPES)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, not {self.batch_sizes}")


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    dtypes: tuple[str, ...]
    """Of ``SPLIT_TOLERANCE``; each compared, and timed, on its own."""
    batch_size: int
    duration_s: float
    """Timed seconds per engine (one device, split) per dtype."""

    def __post_init__(self) -> None:
        _check_dtypes(self.dtypes, SPLIT_TOLERANCE)


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    model: TinyGptSpec = field(default_factory=TinyGptSpec)
    levels: tuple[int, ...]
    """Closed-loop concurrencies for continuous batching (each c keeps c requests in flight)."""
    min_requests: int
    """Requests per level at least; a level sends max(this, 3 c)."""
    sequential_requests: int
    mean_tokens: int
    """Mean new tokens per request (lengths uniform over about half of it either side)."""
    prompt_tokens: tuple[int, int]
    """Shortest and longest prompt, tokens."""

    def __post_init__(self) -> None:
        if not self.levels or min(self.levels) < 1 or self.sequential_requests < 1:
            raise ValueError("concurrencies and sequential_requests must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    preset: str
    seq_len: int
    batch_size: int
    """Sequences per step; tokens per step = this x ``seq_len``."""
    steps: int
    """Timed steps, after the warm-up steps."""
    warmup_steps: int = 5
    """Untimed steps first (torch.compile compiles in the first; allocator pools fill)."""
    bf16: bool
    """bf16 autocast (a GPU); else fp32."""
    compile: bool
    """Also run the loop under torch.compile."""


def say(line: str) -> None:
    print(line, flush=True)


def error_text(exc: BaseException) -> str:
    """One line for the JSON: the type and the message's first line, at most 300 characters."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def free_memory() -> None:
    """Drop what the last measurement held, so the next starts with the device's memory free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- 1. matmul ceiling ------------------------------------------------------------------------


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls on or off for the block, then as it was (a global switch)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def time_repeated_s(run: Callable[[], object], reps: int, device: torch.device) -> float:
    """Seconds for ``reps`` back-to-back calls: CUDA events around them on a GPU (so only the
    device's time counts, the queue kept full), the wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    started = time.perf_counter()
    for _ in range(reps):
        run()
    return time.perf_counter() - started


def measure_matmul(
    device: torch.device, dtype: str, *, size: int, min_time_s: float
) -> dict[str, Any]:
    """TFLOP/s of ``size``-square matmuls in ``dtype``: 3 warm-up calls, one timed call to size
    the run, then enough calls to fill ``min_time_s`` (3 to 10 000). 2 n^3 FLOPs each: n = 8192
    is 1.1 TFLOP, ~1.5 ms at 750 TFLOP/s."""
    torch_dtype = TORCH_DTYPES[dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=torch_dtype)

    def run() -> None:
        torch.matmul(a, b, out=out)

    with _tf32_matmuls(dtype == "tf32") if device.type == "cuda" else contextlib.nullcontext():
        time_repeated_s(run, 3, device)
        one_s = time_repeated_s(run, 1, device)
        reps = max(3, min(10_000, math.ceil(min_time_s / max(one_s, 1e-6))))
        seconds = time_repeated_s(run, reps, device)
    return {
        "dtype": dtype,
        "size": size,
        "reps": reps,
        "seconds": seconds,
        "ms_per_matmul": seconds / reps * 1000,
        "tflops": 2 * size**3 * reps / seconds / 1e12,
    }


def run_matmul(config: MatmulConfig, device: torch.device) -> dict[str, Any]:
    results = []
    for dtype in config.dtypes:
        try:
            result = measure_matmul(device, dtype, size=config.size, min_time_s=config.min_time_s)
            say(
                f"matmul {dtype} n={result['size']}: {result['tflops']:.2f} TFLOP/s "
                f"({result['ms_per_matmul']:.2f} ms each)"
            )
        except Exception as exc:
            result = {"dtype": dtype, "error": error_text(exc)}
            say(f"matmul {dtype}: error: {result['error']}")
        results.append(result)
        free_memory()
    return {"results": results}


def ceilings_tflops(matmul: Mapping[str, Any] | None) -> dict[str, float]:
    """The measured matmul TFLOP/s by dtype from the matmul part's record (None: not run)."""
    results = (matmul or {}).get("results", [])
    return {r["dtype"]: r["tflops"] for r in results if r.get("tflops")}


# ---- 2. the embeddings engine -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EncoderShape:
    """What the FLOPs estimate needs of an encoder."""

    layers: int
    hidden: int
    layer_params: int
    """Parameters of the stack of layers (MiniLM: 6 x 1,774,464 = 10,646,784)."""


def encoder_shape(model_dir: Path) -> EncoderShape:
    """The encoder's layers, width and layer-stack parameters, counted on a model built on the
    ``meta`` device from the folder's config (no weights read, no memory used)."""
    from transformers import AutoConfig, AutoModel

    from models.parallel import find_layer_stack

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    _, layers = find_layer_stack(model)
    return EncoderShape(
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        layer_params=sum(p.numel() for p in layers.parameters()),
    )


def batch_flops(shape: EncoderShape, *, batch_size: int, padded_len: int) -> int:
    """Model FLOPs of one forward pass over ``batch_size`` texts padded to ``padded_len``:
    ``2 N B T`` for the layers' matmuls + ``4 L H T^2 B`` for attention's QK^T and AV.
    MiniLM, B = 1024, T = 16: 2 x 10.6 M x 16384 + 4 x 6 x 384 x 256 x 1024 = 351 GFLOP."""
    tokens = batch_size * padded_len
    attention = 4 * shape.layers * shape.hidden * padded_len**2 * batch_size
    return 2 * shape.layer_params * tokens + attention


class _PaddedLengths:
    """The padded length of ``batch_at(texts, B, i)`` (its longest text, in tokens), tokenised
    once per distinct batch: batch i starts at text B i mod len(texts)."""

    def __init__(self, count_tokens: Callable[[Sequence[str]], list[int]], texts: list[str]):
        self._count_tokens = count_tokens
        self._texts = texts
        self._known: dict[tuple[int, int], int] = {}

    def __call__(self, batch_size: int, index: int) -> int:
        key = (batch_size, batch_size * index % len(self._texts))
        if key not in self._known:
            self._known[key] = max(self._count_tokens(batch_at(self._texts, batch_size, index)))
        return self._known[key]


def run_embeddings(
    config: EmbedConfig, device: torch.device, model_dir: Path, ceilings: Mapping[str, float]
) -> dict[str, Any]:
    """The embedding engine at each batch size in each dtype: texts/s, batch latency, and
    model FLOP/s (``batch_flops`` of the batches actually run) against ``ceilings``."""
    from models.engines.embed import EmbeddingEngine

    shape = encoder_shape(model_dir)
    texts = list(SENTENCES)  # 64 sentences; batch i takes the next B of them, cyclically
    results: list[dict[str, Any]] = []
    for dtype in config.dtypes:
        try:
            engine = EmbeddingEngine(model_dir, device=str(device), dtype=ENGINE_DTYPES[dtype])
            engine.load()
            engine.warmup()
        except Exception as exc:
            results.append({"dtype": dtype, "error": error_text(exc)})
            say(f"embeddings {dtype}: error: {results[-1]['error']}")
            continue
        padded_len = _PaddedLengths(engine.count_tokens, texts)
        for batch_size in config.batch_sizes:
            entry: dict[str, Any] = {"dtype": dtype, "batch_size": batch_size}
            sweep = SweepConfig(
                batch_sizes=(batch_size,), duration_s_per_size=config.duration_s_per_size
            )
            try:
                summary = measure_batch_size(engine, texts, batch_size, sweep)
                # measure_batch_size runs batch_at(texts, B, i) for i = 0 .. batches - 1
                lengths = [padded_len(batch_size, i) for i in range(summary.batches)]
            except Exception as exc:
                entry["error"] = error_text(exc)
                results.append(entry)
                say(f"embeddings {dtype} b={batch_size}: error: {entry['error']}")
                free_memory()
                continue
            flops = sum(batch_flops(shape, batch_size=batch_size, padded_len=t) for t in lengths)
            model_tflops = flops / summary.duration_s / 1e12
            ceiling = ceilings.get(dtype)
            entry.update(
                batches=summary.batches,
                duration_s=summary.duration_s,
                texts_per_s=summary.texts_per_s,
                p50_ms=summary.p50_ms,
                p95_ms=summary.p95_ms,
                padded_tokens_per_batch=batch_size * sum(lengths) / len(lengths),
                model_tflops=model_tflops,
                ceiling_tflops=ceiling,
                ceiling_share=model_tflops / ceiling if ceiling else None,
            )
            results.append(entry)
            share = entry["ceiling_share"]
            say(
                f"embeddings {dtype} b={batch_size}: {summary.texts_per_s:.0f} texts/s, "
                f"p50 {summary.p50_ms:.2f} ms, {model_tflops:.4f} model TFLOP/s"
                + ("" if share is None else f" = {share:.2%} of the {dtype} matmul ceiling")
            )
        del engine
        free_memory()
    return {
        "model_dir": str(model_dir),
        "encoder": dataclasses.asdict(shape),
        "flops_formula": "2 * layer_params * B * T + 4 * layers * hidden * T^2 * B, "
        "T = the batch's padded length",
        "results": results,
    }


# ---- 3. model-parallel split ------------------------------------------------------------------


def measure_split(model_dir: Path, devices: Sequence[str], config: SplitConfig) -> dict[str, Any]:
    """Per dtype: the same texts through the engine on ``devices[0]`` alone and split across
    ``devices`` (``models.parallel``); the largest |difference| between their unit vectors
    against ``SPLIT_TOLERANCE``, and each one's texts/s at ``config.batch_size``."""
    import numpy as np

    from models.engines.embed import EmbeddingEngine

    texts = take_cycled(config.batch_size)
    sweep = SweepConfig(batch_sizes=(config.batch_size,), duration_s_per_size=config.duration_s)

    def texts_per_s(engine: BatchRunner) -> float:
        return measure_batch_size(engine, texts, config.batch_size, sweep).texts_per_s

    results = []
    for dtype in config.dtypes:
        entry: dict[str, Any] = {"dtype": dtype, "devices": list(devices)}
        try:
            single = EmbeddingEngine(model_dir, device=devices[0], dtype=ENGINE_DTYPES[dtype])
            split = EmbeddingEngine(model_dir, devices=list(devices), dtype=ENGINE_DTYPES[dtype])
            for engine in (single, split):
                engine.load()
                engine.warmup()
            diff = float(np.max(np.abs(single.run(texts).vectors - split.run(texts).vectors)))
            single_rate, split_rate = texts_per_s(single), texts_per_s(split)
        except Exception as exc:
            entry["error"] = error_text(exc)
            results.append(entry)
            say(f"split {dtype}: error: {entry['error']}")
            free_memory()
            continue
        tolerance = SPLIT_TOLERANCE[dtype]
        entry.update(
            batch_size=config.batch_size,
            max_abs_diff=diff,
            tolerance=tolerance,
            equal=diff <= tolerance,
            single_texts_per_s=single_rate,
            split_texts_per_s=split_rate,
        )
        results.append(entry)
        say(
            f"split {dtype} over {list(devices)}: max |diff| {diff:.2e} "
            f"({'within' if diff <= tolerance else 'PAST'} {tolerance:g}), "
            f"{split_rate:.0f} texts/s split vs {single_rate:.0f} on one device"
        )
        del single, split
        free_memory()
    return {"results": results}


# ---- 4. generation ----------------------------------------------------------------------------


def drive_closed_loop(
    engine: Any,
    requests: Sequence[GenerationRequest],
    *,
    concurrency: int,
    total: int,
    timeout_s: float,
) -> tuple[list[RequestTiming], int, int]:
    """``concurrency`` clients of a ``GenerationEngine``, each sending its next request
    (greedy, exactly its ``max_tokens``) as soon as the last is answered, until ``total`` are
    answered. Returns the timings and the window with ``concurrency`` in flight throughout:
    from the first send to the last (after it the loop drains)."""
    from models.engines.generate import SamplingParams, SequenceUpdate

    done: queue.SimpleQueue[tuple[int, SequenceUpdate, int]] = queue.SimpleQueue()
    sent_ns: dict[int, int] = {}
    first_ns: dict[int, int] = {}

    def send(k: int) -> None:
        request = requests[k % len(requests)]

        def on_update(update: SequenceUpdate) -> None:  # on the engine's thread: short
            now = time.perf_counter_ns()
            if k not in first_ns and update.completion_tokens > 0:
                first_ns[k] = now
            if update.finished:
                done.put((k, update, now))

        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
        sent_ns[k] = time.perf_counter_ns()
        engine.submit(request.prompt, params, on_update=on_update)

    start_ns = last_send_ns = time.perf_counter_ns()
    for k in range(min(concurrency, total)):
        send(k)
    next_k = min(concurrency, total)
    timings = []
    for _ in range(total):
        k, update, done_ns = done.get(timeout=timeout_s)
        if update.error is not None:
            raise RuntimeError(f"request {k} failed: {update.error}")
        timings.append(
            RequestTiming(
                sent_ns=sent_ns[k],
                first_token_ns=first_ns.get(k, done_ns),
                done_ns=done_ns,
                tokens=update.completion_tokens,
            )
        )
        if next_k < total:
            send(next_k)
            next_k += 1
            last_send_ns = time.perf_counter_ns()
    return timings, start_ns, last_send_ns


def run_generation(config: GenerateConfig, device: torch.device) -> dict[str, Any]:
    """Sequential ``model.generate`` against the generation engine's continuous batching on
    a random GPT-2 built here, the same requests for both."""
    from benchmarks.generation_inprocess import InProcessGenerator
    from benchmarks.generation_model import (
        build_tiny_gpt,
        make_prompts,
        output_lengths,
        pair_requests,
    )
    from models.engines.generate import GenerationEngine

    count = max(64, config.sequential_requests)
    low, high = config.prompt_tokens
    with tempfile.TemporaryDirectory(prefix="loom-gpu-gen-") as tmp:
        folder = Path(tmp) / "tinygpt"
        params = build_tiny_gpt(folder, config.model)
        prompts = make_prompts(folder, count=count, min_tokens=low, max_tokens=high)
        lengths = output_lengths(count, mean_tokens=config.mean_tokens, seed=2)
        requests = pair_requests([p.text for p in prompts], lengths)
        say(f"generation: a random GPT-2 of {params / 1e6:.1f} M parameters on {device}")

        generator = InProcessGenerator.load(
            folder, threads=torch.get_num_threads(), device=str(device)
        )
        services = generator.sequential(requests, count=config.sequential_requests, warmup=2)
        dtype = str(generator.model.dtype).removeprefix("torch.")
        del generator
        free_memory()
        tokens = sum(s.tokens for s in services)
        sequential = {
            "requests": len(services),
            "tokens": tokens,
            "tokens_per_s": tokens / ((services[-1].done_ns - services[0].sent_ns) / 1e9),
            "ttft_p50_ms": latency_ms([s.ttft_ns for s in services]).p50_ms,
        }
        say(
            f"generation sequential generate: {sequential['tokens_per_s']:.0f} tokens/s, "
            f"TTFT p50 {sequential['ttft_p50_ms']:.1f} ms"
        )

        engine = GenerationEngine(folder, device=str(device), max_sequences=max(config.levels))
        engine.load()
        levels = []
        try:
            engine.warmup()
            warm = min(4, max(config.levels))
            drive_closed_loop(engine, requests, concurrency=warm, total=2 * warm, timeout_s=300)
            for concurrency in config.levels:
                total = max(config.min_requests, 3 * concurrency)
                timings, start_ns, end_ns = drive_closed_loop(
                    engine, requests, concurrency=concurrency, total=total, timeout_s=300
                )
                window_s = (end_ns - start_ns) / 1e9
                levels.append(
                    {
                        "concurrency": concurrency,
                        "requests": total,
                        "window_s": window_s,
                        "tokens_per_s": tokens_in_window(timings, start_ns, end_ns) / window_s,
                        "ttft_p50_ms": latency_ms([t.ttft_ns for t in timings]).p50_ms,
                    }
                )
                say(
                    f"generation continuous batching c={concurrency}: "
                    f"{levels[-1]['tokens_per_s']:.0f} tokens/s, "
                    f"TTFT p50 {levels[-1]['ttft_p50_ms']:.1f} ms"
                )
        finally:
            engine.close()
    return {
        "model": {**dataclasses.asdict(config.model), "params": params, "dtype": dtype},
        "mean_new_tokens": config.mean_tokens,
        "prompt_tokens": [low, high],
        "method": "sequential: model.generate one request at a time, greedy, each to its own "
        "max_tokens, tokens / wall time; continuous: GenerationEngine, c closed-loop clients, "
        "tokens made between the first send and the last (c in flight throughout) / that time",
        "sequential": sequential,
        "continuous": levels,
    }


# ---- 5. training ------------------------------------------------------------------------------


def run_training(
    config: TrainConfig,
    device: torch.device,
    ceilings: Mapping[str, float],
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The ``lm`` trainer's loop on random tokens (``benchmarks.training_mfu``), eager and, if
    asked, compiled: tokens/s, model TFLOP/s, MFU against the data-sheet peak (a known GPU in
    bf16) or else the measured matmul ceiling of the dtype. ``on_run(record)`` sees the record
    so far after each run (torch.compile may take minutes: what ran before it is kept)."""
    from benchmarks.training_mfu import measure_lm_training, peak_bf16_flops, random_token_program

    dtype = "bf16" if config.bf16 else "fp32"
    runs: list[dict[str, Any]] = []
    record = {
        "flops_formula": "6 N + 12 L d T per token, N = parameters less the position table",
        "runs": runs,
    }
    for compiled in (False, True) if config.compile else (False,):
        entry: dict[str, Any] = {"preset": config.preset, "dtype": dtype, "compiled": compiled}
        try:
            with tempfile.TemporaryDirectory(prefix="loom-gpu-train-") as tmp:
                program = random_token_program(
                    Path(tmp),
                    preset=config.preset,
                    seq_len=config.seq_len,
                    batch_size=config.batch_size,
                    steps=config.steps,
                )
                run = measure_lm_training(
                    program,
                    device=device,
                    steps=config.steps,
                    warmup_steps=config.warmup_steps,
                    bf16=config.bf16,
                    compile_model=compiled,
                )
        except Exception as exc:
            entry["error"] = error_text(exc)
            runs.append(entry)
            say(f"training {config.preset} compiled={compiled}: error: {entry['error']}")
            free_memory()
            if on_run is not None:
                on_run(record)
            continue
        entry.update(dataclasses.asdict(run))
        ceiling = ceilings.get(dtype)
        sheet = peak_bf16_flops(run.device_name) if device.type == "cuda" and config.bf16 else None
        if sheet is not None:
            peak, basis = sheet[0] / 1e12, f"data sheet: {sheet[1]} bf16 dense"
        elif ceiling:
            peak, basis = ceiling, f"measured {dtype} matmul ceiling"
        else:
            peak, basis = None, "no peak known"
        model_tflops = run.model_flops_per_s / 1e12
        entry.update(
            model_tflops=model_tflops,
            peak_tflops=peak,
            peak_basis=basis,
            mfu=model_tflops / peak if peak else None,
            ceiling_tflops=ceiling,
            ceiling_share=model_tflops / ceiling if ceiling else None,
        )
        runs.append(entry)
        mfu = "n/a" if entry["mfu"] is None else f"{entry['mfu']:.1%}"
        say(
            f"training {run.preset} {run.dtype}{' compiled' if compiled else ''}: "
            f"{run.tokens_per_s:.0f} tokens/s, {model_tflops:.3f} model TFLOP/s, "
            f"MFU {mfu} ({basis}), final loss {run.final_loss:.2f}"
        )
        free_memory()
        if on_run is not None:
            on_run(record)
    return record
