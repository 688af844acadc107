"""Text generation (issue 3): the Loom stack's continuous batching against sequential
``model.generate``, static batching and transformers' own continuous batching in-process, at
several concurrency levels, in one run.

    python -m benchmarks.generation                       # full run, a few minutes on 2 cores
    python -m benchmarks.generation --quick               # a short smoke run
    python -m benchmarks.generation --only sequential,static --concurrency 1,8
    python -m benchmarks.generation --only cb,stack --cb-attention eager
    python -m benchmarks.generation --fixed-length        # every request --max-tokens long

Every variant serves the same ~10M-parameter random GPT-2 (``generation_model``) the same
fixed list of requests, greedily, EOS ignored: prompts of 32-64 tokens, each asking for its
own number of new tokens, uniform over [M/2, 3M/2] for ``--max-tokens`` M (32-96 for 64, mean
exactly 64), from a seed of its own. Varied lengths are real traffic, and the case continuous
batching is for; with ``--fixed-length`` every request makes M, so the stack's closed-loop
clients finish together and arrive together (the lockstep worst case for TTFT).

- sequential: ``model.generate`` one request at a time; c closed-loop clients replayed over
  its timings (``generation_inprocess``);
- static: c prompts left-padded into one ``generate`` call per batch, run to its longest
  request's length; only each request's own length counts as useful tokens;
- cb: transformers' ``ContinuousBatchingManager`` (the engine the stack wraps) in this
  process, c closed-loop clients each keeping one request in flight for the stack's warm-up
  and window (``generation_cb``);
- stack: ``loom serve`` in a subprocess, c clients streaming ``/v1/completions`` over HTTP
  (``generation_client``);
- logprobs: the same server at the top concurrency, the plain requests and then the same
  requests with ``logprobs: 5`` on every fourth, in turns (plain, mixed, three times), so the
  two see the same machine; ``logprobs_share`` is mixed tokens/s over plain (goal >= 0.9:
  asking for logprobs must not slow the batch down for everyone).

Each prints one line per concurrency with tokens/s and TTFT p50/p95; the end prints the three
targets with PASS/MISS and writes everything to ``benchmarks/results/generation-<time>.json``.
A variant that fails (cb on a transformers without the manager, the stack not starting) has
its ``error`` recorded; the others are still run and reported, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.embeddings import _jsonable, finish_run, say, warn_if_busy
from benchmarks.generation_cb import CB_API, TransformersCbEngine, cb_settings, run_closed_loop
from benchmarks.generation_client import StreamLoadConfig, completion_request, run_stream_load
from benchmarks.generation_model import (
    GenerationRequest,
    Prompt,
    TinyGptSpec,
    build_tiny_gpt,
    make_prompts,
    output_length_bounds,
    output_lengths,
    pair_requests,
    register_tiny_gpt,
)
from benchmarks.generation_report import (
    GenerationGoals,
    GenerationLevel,
    evaluate_generation_targets,
    format_generation_line,
    sequential_figures,
    static_figures,
    summarise_generation,
    useful_token_share,
    window_figures,
)
from benchmarks.machine import machine_facts
from benchmarks.options import parse_env_assignments, parse_int_list
from benchmarks.processes import ServerNotReady, ServerProcess, ServerSpec
from benchmarks.report import format_target_line, target_record
from benchmarks.setups import stack_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
VARIANTS = ("sequential", "static", "cb", "stack", "logprobs")
STACK_VARIANTS = frozenset({"stack", "logprobs"})
LOGPROBS = 5
"""What a scoring request asks for in the logprobs variant: the top 5, OpenAI's legacy cap."""
LOGPROBS_EVERY = 4
"""Every fourth request of the logprobs variant's mixed turns asks for logprobs."""
LOGPROBS_TURNS = 3
"""Plain and mixed windows, taken in turns, each this many times."""
IN_PROCESS_VARIANTS = frozenset({"sequential", "static", "cb"})


@dataclass(frozen=True, kw_only=True)
class GenerationBenchConfig:
    """One run of the generation benchmark."""

    levels: tuple[int, ...] = (1, 8, 32)
    """Concurrency levels: closed-loop clients, each with one request in flight."""
    max_tokens: int = 64
    """Mean new tokens per request (EOS ignored): each request's own is drawn from
    ``output_length_bounds`` (32-96 for 64), or is exactly this with ``fixed_length``."""
    fixed_length: bool = False
    """Every request makes exactly ``max_tokens``: clients in lockstep, TTFT's worst case."""
    length_seed: int = 2
    """Seeds the output lengths, apart from the prompts' seed."""
    variants: tuple[str, ...] = VARIANTS
    duration_s: float = 20.0
    """The measured window per level of the closed loops driven for real: the stack and cb."""
    warmup_s: float = 5.0
    """Load on the stack (and cb) before each level's window opens, not recorded."""
    requests: int = 32
    """In-process requests measured per level (after a closed loop's first round)."""
    min_static_batches: int = 3
    """Static batching runs max(this, requests / c) batches per level."""
    cb_attention: str = "sdpa"
    """Attention implementation of the cb variant (``sdpa`` or ``eager``, see
    ``generation_cb.CbSettings``)."""
    threads: int = 1
    """Torch threads in-process, and CPUs and threads of the stack's one replica."""
    prompts: int = 64
    """Distinct prompts cycled through."""
    model_name: str = "tinygpt"
    model: TinyGptSpec = field(default_factory=TinyGptSpec)
    stack_config_path: Path | None = None
    """Serving YAML to use as is; ``None`` generates one for ``model_name``."""
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Fields of the generated model config to replace (e.g. generation settings)."""
    stack_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the stack's subprocess only."""
    ready_timeout_s: float = 300.0
    out_path: Path | None = None
    """``None``: ``benchmarks/results/generation-<UTC time>.json``."""

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0 or self.ready_timeout_s <= 0:
            raise ValueError("durations must be > 0 (warm-up >= 0)")
        if min(self.max_tokens, self.requests, self.threads, self.prompts) < 1:
            raise ValueError("--max-tokens, --requests, --threads and prompts must be >= 1")
        if self.min_static_batches < 1:
            raise ValueError("min_static_batches must be >= 1")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or not self.variants:
            raise ValueError(f"variants must be some of {', '.join(VARIANTS)}; got {unknown}")


def full_config() -> GenerationBenchConfig:
    return GenerationBenchConfig()


def quick_config() -> GenerationBenchConfig:
    """A smoke run: short windows, few requests (a minute or two plus the stack's start)."""
    return GenerationBenchConfig(
        duration_s=6.0, warmup_s=3.0, requests=8, min_static_batches=2, prompts=32
    )


def parse_variant_names(text: str) -> tuple[str, ...]:
    """``"stack, static"`` -> ("stack", "static"), in the order given, duplicates dropped;
    ``ValueError`` for a name that is not a variant."""
    names: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}: expected some of {', '.join(VARIANTS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no variants in {text!r}")
    return tuple(names)


def default_out_path(now: dt.datetime) -> Path:
    """``benchmarks/results/generation-20250101T120000Z.json`` for ``now`` (UTC)."""
    return RESULTS_DIR / f"generation-{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}.json"


def parse_args(argv: Sequence[str] | None) -> GenerationBenchConfig:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generation", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="short windows, few requests")
    parser.add_argument("--concurrency", help="levels, e.g. 1,8,32")
    parser.add_argument("--max-tokens", type=int, help="mean new tokens per request")
    parser.add_argument(
        "--fixed-length", action="store_true", default=None,
        help="every request makes exactly --max-tokens (clients in lockstep)",
    )  # fmt: skip
    parser.add_argument("--only", help=f"variants to run, some of {','.join(VARIANTS)}")
    parser.add_argument("--duration-s", type=float, help="the stack's and cb's window per level")
    parser.add_argument("--warmup-s", type=float, help="the stack's and cb's warm-up per level")
    parser.add_argument("--requests", type=int, help="in-process requests measured per level")
    parser.add_argument("--threads", type=int, help="torch threads (and the stack's CPUs)")
    parser.add_argument("--cb-attention", help="cb's attention implementation: sdpa or eager")
    parser.add_argument("--config", type=Path, help="serving YAML for the stack, used as is")
    parser.add_argument(
        "--model-set", action="append", default=[], metavar="FIELD=YAML",
        help="replace a field of the generated stack model config (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for the stack subprocess (repeatable)",
    )  # fmt: skip
    parser.add_argument("--ready-timeout-s", type=float)
    parser.add_argument("--out", type=Path, help="JSON path (default: results/generation-*)")
    args = parser.parse_args(argv)
    base = quick_config() if args.quick else full_config()
    try:
        overrides: dict[str, Any] = {
            "levels": parse_int_list(args.concurrency) if args.concurrency else None,
            "max_tokens": args.max_tokens,
            "fixed_length": args.fixed_length,
            "variants": parse_variant_names(args.only) if args.only else None,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "requests": args.requests,
            "threads": args.threads,
            "cb_attention": args.cb_attention,
            "stack_config_path": args.config,
            "ready_timeout_s": args.ready_timeout_s,
            "out_path": args.out,
            "model_overrides": {
                k: yaml.safe_load(v) for k, v in parse_env_assignments(args.model_set).items()
            },
            "stack_env": parse_env_assignments(args.env),
        }
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        parser.error(str(exc))


def stack_model_config(config: GenerationBenchConfig) -> dict[str, Any]:
    """The generated serving config: one replica of the generate model on ``threads`` CPUs
    (the same compute the in-process variants get)."""
    model = {
        "name": config.model_name,
        "source": config.model_name,
        "task": "generate",
        "replicas": 1,
        "num_cpus": config.threads,
        "torch_threads": config.threads,
    }
    return {"models": [model | dict(config.model_overrides)]}


def generation_requests(
    prompts: Sequence[str], config: GenerationBenchConfig
) -> list[GenerationRequest]:
    """The fixed list every variant serves: prompt i with output length i, the lengths drawn
    with ``length_seed`` (or all ``max_tokens`` with ``fixed_length``)."""
    if config.fixed_length:
        lengths = [config.max_tokens] * len(prompts)
    else:
        lengths = output_lengths(
            len(prompts), mean_tokens=config.max_tokens, seed=config.length_seed
        )
    return pair_requests(prompts, lengths)


def length_record(
    requests: Sequence[GenerationRequest], config: GenerationBenchConfig
) -> dict[str, Any]:
    """The output lengths used, for the JSON."""
    lengths = [r.max_tokens for r in requests]
    low, high = (
        (config.max_tokens, config.max_tokens)
        if config.fixed_length
        else output_length_bounds(config.max_tokens)
    )
    return {
        "distribution": "fixed" if config.fixed_length else "uniform",
        "bounds": [low, high],
        "seed": None if config.fixed_length else config.length_seed,
        "requests": len(lengths),
        "max_tokens_min": min(lengths),
        "max_tokens_mean": sum(lengths) / len(lengths),
        "max_tokens_max": max(lengths),
    }


def static_batches(requests: int, concurrency: int, min_batches: int) -> int:
    """Batches of ``concurrency`` to run: enough for ``requests`` requests, at least
    ``min_batches``: 32 requests at c=8 -> 4; at c=32 -> max(1, 3) = 3."""
    return max(min_batches, math.ceil(requests / concurrency))


def run_in_process(
    model_dir: Path, requests: Sequence[GenerationRequest], config: GenerationBenchConfig
) -> dict[str, Any]:
    """Sequential and static batching with ``model.generate``, then cb on the same model; the
    model is freed after."""
    from benchmarks.generation_inprocess import InProcessGenerator

    generator = InProcessGenerator.load(model_dir, threads=config.threads)
    records: dict[str, Any] = {}
    if "sequential" in config.variants:
        # one back-to-back run long enough for the largest level's steady state
        count = max(config.levels) + config.requests
        services = generator.sequential(requests, count=count, warmup=2)
        levels = []
        for concurrency in config.levels:
            figures = sequential_figures(services, concurrency)
            levels.append(summarise_generation(concurrency=concurrency, figures=figures))
            say(format_generation_line("sequential", levels[-1]))
        records["sequential"] = {
            "method": "model.generate one request at a time, each to its own max_tokens, run "
            "back to back once; each level replays c closed-loop clients over those timings "
            "(FIFO); TTFT = queueing behind the requests ahead + time to first token (streamer "
            "hook)",
            "requests_run": count,
            "levels": levels,
        }
    if "static" in config.variants:
        levels, useful_shares = [], {}
        for concurrency in config.levels:
            batches = generator.static(
                requests,
                batch_size=concurrency,
                batches=static_batches(config.requests, concurrency, config.min_static_batches),
                warmup=1,
            )
            figures = static_figures(batches)
            levels.append(summarise_generation(concurrency=concurrency, figures=figures))
            useful_shares[str(concurrency)] = useful_token_share(batches)
            say(format_generation_line("static", levels[-1]))
        records["static"] = {
            "method": "c prompts left-padded into one model.generate call run to the longest "
            "member's max_tokens (min_new_tokens the same), as a static-batching server must; "
            "batches back to back; tokens/s counts only each member's own max_tokens as "
            "useful, not the steps a shorter member's row idles until the longest ends; "
            "TTFT = the batch's time to first token (streamer hook)",
            "useful_token_share": useful_shares,
            "levels": levels,
        }
    if "cb" in config.variants:
        records["cb"] = run_cb(generator.model, generator.tokenizer, requests, config)
    records["device"] = str(generator.device)
    del generator
    gc.collect()
    return records


def run_cb(
    model: Any, tokenizer: Any, requests: Sequence[GenerationRequest], config: GenerationBenchConfig
) -> dict[str, Any]:
    """transformers' continuous batching manager on ``model``, each level a closed loop of c
    clients over the stack's warm-up and window. A failure (no such API in this transformers,
    the manager's loop dying) is recorded as the variant's ``error``, the levels run so far
    kept."""
    import transformers

    context_tokens = int(
        getattr(model.config, "n_positions", 0) or model.config.max_position_embeddings
    )
    settings = cb_settings(
        max_concurrency=max(config.levels),
        context_tokens=context_tokens,
        attention=config.cb_attention,
    )
    record: dict[str, Any] = {
        "method": "transformers' ContinuousBatchingManager in this process (the engine the "
        "stack wraps, without HTTP, Ray or Loom's sampler and detokeniser): c closed-loop "
        "clients, each sending its next request when its last is handed back, for the stack's "
        "warm-up and window; every request to its own max_new_tokens, eos_token_id=-1, greedy; "
        "TTFT = sent (before tokenising) to the first new token's timestamp on the manager's "
        "thread (record_timestamps); tokens counted by overlap with the window, as the stack's",
        "api": CB_API,
        "transformers": transformers.__version__,
        "settings": settings,
        "attention": None,
        "levels": [],
        "error": None,
    }
    try:
        with TransformersCbEngine.start(model, tokenizer, settings) as engine:
            record["attention"] = engine.attention
            say(f"cb: transformers {transformers.__version__}, attention {engine.attention}")
            for concurrency in config.levels:
                result = run_closed_loop(
                    engine,
                    requests,
                    concurrency=concurrency,
                    warmup_s=config.warmup_s,
                    duration_s=config.duration_s,
                )
                figures = window_figures(
                    result.timings, result.window_start_ns, result.window_end_ns
                )
                level = summarise_generation(
                    concurrency=concurrency, figures=figures, errors=result.errors,
                    short=result.short,
                )  # fmt: skip
                say(format_generation_line("cb", level))
                record["levels"].append(level)
                record.setdefault("error_kinds", {})[str(concurrency)] = result.error_kinds
    except Exception as exc:  # recorded: the other variants still run and report
        record["error"] = f"{type(exc).__name__}: {exc}"
        say(f"cb: FAILED: {record['error']}")
    return record


def run_stack(
    spec: ServerSpec, requests: Sequence[GenerationRequest], config: GenerationBenchConfig
) -> dict[str, Any]:
    """Start ``loom serve``, drive each level with streaming completions, stop it."""
    completions = [completion_request(config.model_name, r.prompt, r.max_tokens) for r in requests]
    record: dict[str, Any] = {"argv": list(spec.argv), "levels": [], "error": None}
    server = ServerProcess(spec)
    say(f"stack: starting {' '.join(spec.argv[1:])}")
    levels = config.levels if "stack" in config.variants else ()
    try:
        with server:
            say(f"stack: ready in {server.ready_s:.1f} s")
            if "logprobs" in config.variants:
                record["logprobs"] = run_logprobs_turns(spec.port, requests, config)
            for concurrency in levels:
                if not server.is_running:
                    raise RuntimeError(f"the stack exited\n{server.stderr_tail()}")
                load = StreamLoadConfig(
                    port=spec.port,
                    concurrency=concurrency,
                    warmup_s=config.warmup_s,
                    duration_s=config.duration_s,
                )
                result = run_stream_load(load, completions)
                figures = window_figures(
                    result.timings, result.window_start_ns, result.window_end_ns
                )
                level = summarise_generation(
                    concurrency=concurrency,
                    figures=figures,
                    errors=result.errors,
                    short=result.short,
                    loadgen_cpu_s=result.loadgen_cpu_s,
                )
                say(format_generation_line("stack", level))
                if result.error_kinds:
                    say(f"stack      c={concurrency:<3}: errors by kind {result.error_kinds}")
                record["levels"].append(level)
                record.setdefault("error_kinds", {})[str(concurrency)] = result.error_kinds
    except (ServerNotReady, RuntimeError) as exc:
        record["error"] = str(exc)
        say(f"stack: FAILED: {exc}")
    record["server"] = server.describe()
    return record


def run_logprobs_turns(
    port: int, requests: Sequence[GenerationRequest], config: GenerationBenchConfig
) -> dict[str, Any]:
    """Plain and mixed windows in turns at the top concurrency, on one server (see the
    module docstring); the share is the mixed windows' tokens over the plain ones'."""
    concurrency = max(config.levels)
    plain = [completion_request(config.model_name, r.prompt, r.max_tokens) for r in requests]
    mixed = [
        completion_request(
            config.model_name,
            r.prompt,
            r.max_tokens,
            logprobs=LOGPROBS if i % LOGPROBS_EVERY == 0 else None,
        )
        for i, r in enumerate(requests)
    ]
    turns: dict[str, list[dict[str, Any]]] = {"plain": [], "mixed": []}
    for _ in range(LOGPROBS_TURNS):
        for name, bodies in (("plain", plain), ("mixed", mixed)):
            load = StreamLoadConfig(
                port=port,
                concurrency=concurrency,
                warmup_s=config.warmup_s,
                duration_s=config.duration_s,
            )
            result = run_stream_load(load, bodies)
            figures = window_figures(result.timings, result.window_start_ns, result.window_end_ns)
            level = summarise_generation(
                concurrency=concurrency, figures=figures, errors=result.errors, short=result.short
            )
            say(format_generation_line(f"lp-{name}", level))
            turns[name].append(dataclasses.asdict(level))
    rates = {name: [t["tokens_per_s"] for t in done] for name, done in turns.items()}
    share = sum(rates["mixed"]) / sum(rates["plain"]) if sum(rates["plain"]) else None
    say(f"logprobs: mixed / plain tokens/s at c={concurrency}: {share}")
    return {
        "concurrency": concurrency,
        "logprobs": LOGPROBS,
        "every": LOGPROBS_EVERY,
        "turns": turns,
        "plain_tokens_per_s": sum(rates["plain"]) / len(rates["plain"]),
        "mixed_tokens_per_s": sum(rates["mixed"]) / len(rates["mixed"]),
        "logprobs_share": share,
        "goal": 0.9,
        "met": share is not None and share >= 0.9,
        "error": None,
    }


def summarise(variants: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The targets, printed and as JSON records."""
    levels: dict[str, Sequence[GenerationLevel]] = {
        name: record.get("levels", []) for name, record in variants.items()
    }
    say("--- targets ---")
    targets = evaluate_generation_targets(levels, GenerationGoals())
    for target in targets:
        say(format_target_line(target))
    return [target_record(t) for t in targets]


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    out_path = config.out_path or default_out_path(dt.datetime.now(dt.UTC))
    work_dir = Path(tempfile.mkdtemp(prefix="loom-bench-generation-"))
    started = time.monotonic()
    failed = True  # until every part has run; a crash keeps the server logs
    results: dict[str, Any] = {
        "benchmark": "generation",
        "config": _jsonable(config),
        "machine": machine_facts(REPO_ROOT),
    }
    warn_if_busy(results["machine"])
    try:
        source = work_dir / "tinygpt-source"
        parameters = build_tiny_gpt(source, config.model)
        prompts = make_prompts(source, count=config.prompts)
        config_path = config.stack_config_path
        if config_path is None:
            config_path = work_dir / "stack.yaml"
            config_path.write_text(yaml.safe_dump(stack_model_config(config)))
        spec = stack_spec(
            work_dir=work_dir,
            config_path=config_path,
            model_name=config.model_name,
            extra_env=config.stack_env,
            ready_timeout_s=config.ready_timeout_s,
        )
        # the stack loads the stored copy; the in-process variants load the same folder
        stored = register_tiny_gpt(Path(spec.env["LOOM_HOME"]), source, name=config.model_name)
        results["model"] = model_record(config, parameters, prompts)
        requests = generation_requests([p.text for p in prompts], config)
        lengths = results["output_lengths"] = length_record(requests, config)
        say(
            f"model: {config.model_name}, {parameters / 1e6:.1f}M parameters, prompts "
            f"{results['model']['prompt_tokens_min']}-{results['model']['prompt_tokens_max']} "
            f"tokens, new tokens {lengths['max_tokens_min']}-{lengths['max_tokens_max']} "
            f"(mean {lengths['max_tokens_mean']:.1f}, {lengths['distribution']})"
        )
        variants: dict[str, Any] = {}
        if IN_PROCESS_VARIANTS & set(config.variants):
            in_process = run_in_process(stored, requests, config)
            results["in_process_device"] = in_process.pop("device")
            variants |= in_process
        if STACK_VARIANTS & set(config.variants):
            stack = run_stack(spec, requests, config)
            stack["config"] = yaml.safe_load(config_path.read_text())
            if "logprobs" in config.variants:
                variants["logprobs"] = stack.pop("logprobs")
            if "stack" in config.variants:
                variants["stack"] = stack
        results["variants"] = variants
        results["targets"] = summarise(variants)
        failed = any(record.get("error") for record in variants.values())
    finally:
        finish_run(results, out_path, work_dir, started=started, failed=failed)
    return 1 if failed else 0


def model_record(
    config: GenerationBenchConfig, parameters: int, prompts: Sequence[Prompt]
) -> dict[str, Any]:
    lengths = [p.tokens for p in prompts]
    return {
        "name": config.model_name,
        "parameters": parameters,
        "spec": config.model,
        "prompts": len(prompts),
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "max_tokens": config.max_tokens,
    }


if __name__ == "__main__":
    sys.exit(main())
