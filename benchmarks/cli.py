"""``loom bench``: every benchmark from one command, into one run folder.

    loom bench all --quick                       # every CPU benchmark's smoke run, a few minutes
    loom bench embeddings                        # engine, stack, Ray Serve alone, plain FastAPI
    loom bench generation --concurrency 1,8,32 --duration-s 20
    loom bench gpu --device cuda                 # the engines on a GPU, without Ray
    loom bench embeddings -- --skip-plain        # the module's own flags after --
    loom bench compare RUN_A RUN_B --fail-below 0.9
    loom bench report RUN_DIR                    # redraw report.md and the plots

A run folder (``--out``, default ``benchmarks/results/<UTC time>-<benchmarks>``) holds
``result.json``, ``report.md``, one PNG per chart, ``raw/<benchmark>.json`` (each module's own
JSON) and ``logs/<benchmark>.log``. The exit status is 1 when a benchmark failed (the rest are
still reported), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.plan import BENCHMARKS, WHAT, BenchOptions, Step, plan

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,8,64"`` -> (1, 8, 64): positive, ascending, no duplicates."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"levels are positive integers: {text!r}")
    return tuple(sorted(set(levels)))


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"seconds must be positive: {text!r}")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run benchmarks into a run folder; compare two runs",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name in (*BENCHMARKS, "all"):
        what = WHAT.get(name, "every benchmark above (gpu with --device cuda)")
        run = commands.add_parser(name, help=what, description=what)
        _run_options(run)
        run.set_defaults(func=run_command, benchmarks=[name])
    compare = commands.add_parser("compare", help="ratios between two runs' figures")
    compare.add_argument("a", type=Path, help="the run to compare against (folder or JSON)")
    compare.add_argument("b", type=Path, help="the run compared")
    compare.add_argument(
        "--fail-below",
        type=float,
        default=None,
        help="exit 1 when any figure's B-vs-A ratio (above 1 is better) is under this",
    )
    compare.set_defaults(func=compare_command)
    report = commands.add_parser("report", help="rewrite a run's report.md and plots")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=report_command)


def _run_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    command.add_argument("--quick", action="store_true", help="each module's smoke run")
    command.add_argument(
        "--duration-s", type=positive_seconds, default=None, help="measured window per level"
    )
    command.add_argument(
        "--concurrency", type=parse_levels, default=(), help="closed-loop levels, e.g. 1,8,32,64"
    )
    command.add_argument("--out", type=Path, default=None, help="the run folder")
    command.add_argument(
        "module_args", nargs="*", help="after --: the module's own flags (one benchmark)"
    )


def default_run_dir(names: list[str], now: dt.datetime) -> Path:
    what = "all" if len(names) > 2 else "-".join(names)
    return RESULTS_DIR / f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{what}"


def _fail(message: str, status: int = 2) -> int:
    print(f"loom bench: {message}", file=sys.stderr)
    return status


def _cuda_present() -> bool:
    from benchmarks.machine import gpu_facts

    return gpu_facts() is not None


def run_command(args: argparse.Namespace) -> int:
    options = BenchOptions(
        device=args.device,
        quick=args.quick,
        duration_s=args.duration_s,
        concurrency=tuple(args.concurrency),
        module_args=tuple(a for a in args.module_args if a != "--"),
    )
    try:
        steps = plan(args.benchmarks, options)
    except ValueError as exc:
        return _fail(str(exc))
    if options.device == "cuda" and not _cuda_present():
        return _fail("--device cuda: torch sees no CUDA device on this machine")
    now = dt.datetime.now(dt.UTC)
    run_dir = args.out or default_run_dir([step.name for step in steps], now)
    if run_dir.exists() and any(run_dir.iterdir()):
        return _fail(f"{run_dir} is not empty: name a new folder with --out")
    return run(steps, options, run_dir, command=typed_command(args.bench_command), started=now)


def typed_command(benchmark: str, argv: list[str] | None = None) -> list[str]:
    """The command as typed, from the benchmark's name on, whichever way it was started
    (``loom bench ...`` or ``python -m benchmarks.cli ...``)."""
    argv = sys.argv if argv is None else argv
    rest = argv[argv.index(benchmark) + 1 :] if benchmark in argv else []
    return ["loom", "bench", benchmark, *rest]


def run(
    steps: list[Step],
    options: BenchOptions,
    run_dir: Path,
    *,
    command: list[str],
    started: dt.datetime,
    measure_ceiling: Callable[[], dict[str, Any]] | None = None,
) -> int:
    """Run ``steps`` into ``run_dir`` and write the result, even after a failure or Ctrl-C.
    The load generator's ceiling is measured first (``ceiling.measure_ceiling`` unless
    given), and figures near it are refused."""
    from benchmarks import ceiling as ceilings
    from benchmarks.machine import machine_facts
    from benchmarks.result import Section
    from benchmarks.run_report import REPORT_FILE, build_result, write_run
    from benchmarks.runner import Interrupted, Progress, run_step

    run_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_facts(REPO_ROOT, gpu=options.device == "cuda")
    clock = time.monotonic()
    ceiling = (measure_ceiling or ceilings.measure_ceiling)()
    if "error" in ceiling:
        print(
            f"loom bench: load generator ceiling not measured: {ceiling['error']}", file=sys.stderr
        )
    sections: list[Section] = []
    interrupted = False
    with Progress(sum(step.estimate_s for step in steps)) as progress:
        for index, step in enumerate(steps, start=1):
            progress.started(step, index, len(steps))
            try:
                section = run_step(step, run_dir, progress)
            except Interrupted as stop:
                sections.append(stop.section)
                interrupted = True
                break
            sections.append(section)
            progress.finished(step, section)
    if "requests_per_s" in ceiling:
        ceilings.refuse_near_ceiling(sections, ceiling["requests_per_s"])
    result = build_result(
        sections,
        command=command,
        machine=machine,
        started_utc=started.isoformat(timespec="seconds"),
        wall_s=time.monotonic() - clock,
        options={
            "device": options.device,
            "quick": options.quick,
            "duration_s": options.duration_s,
            "concurrency": list(options.concurrency),
            "benchmarks": [step.name for step in steps],
            "interrupted": interrupted,
        },
    )
    result["loadgen_ceiling"] = ceiling
    write_run(run_dir, result, sections)
    if result.get("plots_error"):
        print(f"loom bench: {result['plots_error']}", file=sys.stderr)
    print(f"loom bench: {run_dir / REPORT_FILE}")
    if interrupted:
        return 130
    return 1 if any(section.status == "failed" for section in sections) else 0


def compare_command(args: argparse.Namespace) -> int:
    from benchmarks.compare import RunError, compare, format_comparison, load_run

    if args.fail_below is not None and not args.fail_below > 0:
        return _fail("--fail-below is a ratio above 0, e.g. 0.9")
    try:
        comparison = compare(load_run(args.a), load_run(args.b))
    except RunError as exc:
        return _fail(str(exc))
    print(format_comparison(comparison), end="")
    if args.fail_below is None:
        return 0
    below = comparison.below(args.fail_below)
    if below:
        names = ", ".join(f"{row.name} {row.ratio:.2f}x" for row in below if row.ratio is not None)
        print(f"\nbelow {args.fail_below:g}: {names}")
        return 1
    print(f"\nevery figure at or above {args.fail_below:g} of A")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Re-read each benchmark's JSON in ``RUN_DIR/raw`` (so a newer Loom's reading applies)
    and rewrite ``result.json``'s figures and sections, ``report.md`` and the plots."""
    import json

    from benchmarks.compare import RESULT_FILE
    from benchmarks.result import Section, all_figures, as_json, section_from_json
    from benchmarks.run_report import REPORT_FILE, write_run
    from benchmarks.runner import read_raw
    from benchmarks.sections import extract

    path = args.run_dir / RESULT_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        recorded = [section_from_json(s) for s in result["sections"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return _fail(f"{path}: not a loom bench run ({exc})")
    sections: list[Section] = []
    for old in recorded:
        raw = read_raw(args.run_dir / old.raw) if old.raw else None
        if raw is None or old.status == "failed":
            sections.append(old)  # nothing to re-read, or a failure to keep as it was
            continue
        section = extract(old.name, raw)
        section.command, section.wall_s, section.raw = old.command, old.wall_s, old.raw
        sections.append(section)
    result["figures"] = as_json(all_figures(sections))
    result["sections"] = as_json(sections)
    write_run(args.run_dir, result, sections)
    if result.get("plots_error"):
        print(f"loom bench: {result['plots_error']}", file=sys.stderr)
    print(f"loom bench: {args.run_dir / REPORT_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.cli ...`` is ``loom bench ...`` where the loom command is not
    installed."""
    parser = argparse.ArgumentParser(prog="loom")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
