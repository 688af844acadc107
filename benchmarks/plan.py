"""What ``loom bench`` runs: each benchmark as its module's own command line, built from the
shared flags, with an estimate of how long it takes (for the progress bar). Pure: no
process is started here.

    options = BenchOptions(device="cpu", quick=True, concurrency=(1, 64))
    steps = plan(["embeddings", "training"], options)
    steps[0].argv    # ("-m", "benchmarks.embeddings", "--duration-s", "3", ..., "--levels", "1,64")

The shared flags map onto each module's own: ``--duration-s`` is a measured window per
level (``faults``: before and after the kill), ``--concurrency`` the closed-loop levels
(a module that takes one level gets the highest), ``--quick`` the module's smoke settings,
and a module's own flags after ``--`` come last, so they win.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Device = Literal["cpu", "cuda"]

BENCHMARKS = (
    "embeddings",
    "generation",
    "training",
    "ensemble",
    "sharding",
    "faults",
    "autoscaling",
    "transports",
    "evaluation",
    "gpu",
)
"""Every benchmark ``loom bench`` knows, in the order ``all`` runs them."""

WHAT = {
    "embeddings": "engine alone, Loom stack, Ray Serve alone and plain FastAPI, side by side",
    "generation": (
        "sequential, static batching, in-process continuous batching and the stack; the stack "
        "with logprobs on a quarter of the requests"
    ),
    "training": "lm trainer as jobs (1 and 2 workers) against a bare training loop",
    "ensemble": "scatter/gather cost over the slowest member, and hedging a straggler",
    "sharding": "many small models: one pool, the pool on 4 replicas, 4 shards by name",
    "faults": "a replica killed under load; overload and restart scenarios",
    "autoscaling": "reaction to a load step: replicas and p95 over time, policy cost",
    "transports": "v2 infer of a classifier with JSON, HTTP binary tensors and gRPC, by size",
    "evaluation": "lm-evaluation-harness on the repo's task: against Loom vs in-process hf",
    "gpu": "the engines on one GPU without Ray: batch sweep, generation, MFU, 2-GPU split",
}
"""What each measures, for ``loom bench --help``."""


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    device: Device = "cpu"
    """``cuda``: the GPU benchmark on CUDA and training's bf16 preset; ``cpu``: every child
    process sees no GPU (``CUDA_VISIBLE_DEVICES=""``), so engines on ``auto`` use the CPU."""
    quick: bool = False
    """Each module's smoke settings: ``all --quick`` is a few minutes on 2 cores."""
    duration_s: float | None = None
    """The measured window per level; None keeps each module's own."""
    concurrency: tuple[int, ...] = ()
    """Closed-loop levels; empty keeps each module's own."""
    module_args: tuple[str, ...] = ()
    """Passed to the module last (one benchmark only)."""


@dataclass(frozen=True, kw_only=True)
class Step:
    """One benchmark of a run: ``python`` + ``argv`` + ``--out`` + ``raw``."""

    name: str
    argv: tuple[str, ...]
    """After the interpreter, before ``--out``."""
    raw: str
    """Where the module writes its JSON, relative to the run folder."""
    out_is_folder: bool = False
    """``--out`` names a folder the module fills (``gpu``), not the JSON file itself."""
    estimate_s: float = 60.0
    """Roughly how long it takes on 2 cores, for the progress bar's "left"."""
    env: dict[str, str] = field(default_factory=dict)
    """Set for the module's process (and so every process it starts)."""

    def command(self, python: str, run_dir: str) -> list[str]:
        out = f"{run_dir}/raw/{self.name}" if self.out_is_folder else f"{run_dir}/{self.raw}"
        return [python, *self.argv, "--out", out]


def _levels(levels: Sequence[int]) -> str:
    return ",".join(str(level) for level in levels)


def _seconds(value: float) -> str:
    return f"{value:g}"


# Each module's quick settings, and its estimate (quick, full) in seconds on 2 cores, from
# `loom bench all --quick` (2026-12-06: 97, 73, 46, 94, 74, 37, 50 s) and full runs.
_QUICK: dict[str, tuple[str, ...]] = {
    "embeddings": (
        "--duration-s", "3", "--warmup-s", "1", "--levels", "1,64",
        "--batch-sizes", "1,32", "--engine-duration-s", "2", "--open-loop-shares", "0.8",
    ),
    # the logprobs turns (six windows) are a full run's: the quick run checks the variants
    "generation": (
        "--quick", "--concurrency", "1,8", "--requests", "6",
        "--only", "sequential,static,cb,stack",
    ),
    "training": ("--quick", "--workers", "1"),
    "ensemble": ("--concurrency", "1", "--duration-s", "2.5", "--warmup-s", "0.5"),
    # 12 models, 6 a replica: one shard swaps models in and out, each of 4 shards holds its
    # share (3 on average; the ring is not exactly even, hence the headroom)
    "sharding": ("--models", "12", "--budget", "6", "--duration-s", "3", "--warmup-s", "1"),
    "faults": ("--scenarios", "kill", "--warmup-s", "1", "--before-s", "3", "--after-s", "4"),
    "autoscaling": ("--setups", "loom-sidecars", "--skip-failover", "--skip-cpu"),
    "transports": ("--quick",),
    "evaluation": (),
    "gpu": ("--quick",),
}  # fmt: skip

_ESTIMATE_S: dict[str, tuple[float, float]] = {
    "embeddings": (100.0, 430.0),
    "generation": (80.0, 500.0),
    "training": (50.0, 420.0),
    "ensemble": (95.0, 420.0),
    "sharding": (75.0, 240.0),
    "faults": (40.0, 300.0),
    "autoscaling": (50.0, 240.0),
    "transports": (60.0, 160.0),
    "evaluation": (60.0, 60.0),
    "gpu": (40.0, 300.0),
}


def _duration(name: str, duration_s: float) -> tuple[str, ...]:
    seconds = _seconds(duration_s)
    if name in ("embeddings", "generation", "ensemble", "sharding", "transports"):
        return ("--duration-s", seconds)
    if name == "faults":
        return ("--before-s", seconds, "--after-s", seconds)
    return ()  # training runs steps, autoscaling a load step, gpu its own windows


def _concurrency(name: str, levels: tuple[int, ...]) -> tuple[str, ...]:
    if name == "embeddings":
        return ("--levels", _levels(levels))
    if name in ("generation", "ensemble"):
        return ("--concurrency", _levels(levels))
    if name in ("sharding", "transports"):
        return ("--concurrency", str(max(levels)))
    if name == "faults":
        return ("--kill-concurrency", str(max(levels)))
    if name == "autoscaling":
        return ("--callers", str(max(levels)))
    return ()


def _device(name: str, device: Device) -> tuple[str, ...]:
    if name == "gpu":
        return ("--device", device)
    if name == "training" and device == "cuda":
        return ("--gpu",)
    return ()


def step_for(name: str, options: BenchOptions) -> Step:
    """``name``'s step under ``options``; ``ValueError`` for an unknown benchmark."""
    if name not in BENCHMARKS:
        raise ValueError(f"no benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}")
    argv: list[str] = ["-m", f"benchmarks.{name}"]
    if options.quick:
        argv += _QUICK[name]
    if options.duration_s is not None:
        argv += _duration(name, options.duration_s)
    if options.concurrency:
        argv += _concurrency(name, options.concurrency)
    argv += _device(name, options.device)
    argv += options.module_args
    quick_s, full_s = _ESTIMATE_S[name]
    return Step(
        name=name,
        argv=tuple(argv),
        raw=f"raw/{name}/gpu.json" if name == "gpu" else f"raw/{name}.json",
        out_is_folder=name == "gpu",
        estimate_s=quick_s if options.quick else full_s,
        env={"CUDA_VISIBLE_DEVICES": ""} if options.device == "cpu" else {},
    )


NOT_IN_QUICK_ALL = frozenset({"evaluation"})
"""Left out of ``all --quick`` (run by name, or in a full ``all``): lm-eval's own start-up
and the server's are the whole of its minute, so a quick run of it says nothing a full one
would not, and ``all --quick`` stays within its 10 minutes."""


def expand(selected: Sequence[str], device: Device, *, quick: bool = False) -> list[str]:
    """``all`` as every benchmark in order (``gpu`` only with ``--device cuda``: on a CPU it
    measures the CPU's code path, which a run asks for by name; ``quick``: not those in
    ``NOT_IN_QUICK_ALL``), duplicates dropped."""
    names: list[str] = []
    for name in selected:
        chosen = (
            [
                b
                for b in BENCHMARKS
                if (b != "gpu" or device == "cuda") and not (quick and b in NOT_IN_QUICK_ALL)
            ]
            if name == "all"
            else [name]
        )
        names += [n for n in chosen if n not in names]
    return names


def plan(selected: Sequence[str], options: BenchOptions) -> list[Step]:
    """The steps of one run, in order. Module arguments apply to a single benchmark only."""
    names = expand(selected, options.device, quick=options.quick)
    if options.module_args and len(names) != 1:
        raise ValueError("arguments after -- go to one benchmark's module, not to several")
    return [step_for(name, options) for name in names]
