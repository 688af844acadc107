"""``loom bench``: the shared flags mapped onto each module's own, a run of real child
processes into a run folder (result.json, report.md, plots, logs) with a failure reported
beside the rest, ``report`` redrawing a finished run, and ``compare``'s exit status."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from benchmarks import cli
from benchmarks.ceiling import refuse_near_ceiling
from benchmarks.plan import BenchOptions, Step, plan, step_for
from benchmarks.result import Section
from benchmarks.runner import section_for
from loom.cli import main as loom_main

RECORDED = Path(__file__).parent / "recorded"


def test_quick_embeddings_runs_every_set_up_at_two_levels_on_the_cpu() -> None:
    step = step_for("embeddings", BenchOptions(quick=True))

    assert step.argv[:2] == ("-m", "benchmarks.embeddings")
    assert step.argv[step.argv.index("--levels") :][:2] == ("--levels", "1,64")
    assert "--skip-rayserve" not in step.argv
    assert "--skip-plain" not in step.argv
    assert step.env == {"CUDA_VISIBLE_DEVICES": ""}  # --device cpu: engines on auto use the CPU
    assert step.command("py", "RUN") == ["py", *step.argv, "--out", "RUN/raw/embeddings.json"]


def test_shared_flags_come_after_the_quick_settings_and_module_flags_after_both() -> None:
    options = BenchOptions(
        quick=True, duration_s=7.5, concurrency=(1, 8, 64), module_args=("--levels", "2")
    )

    argv = step_for("embeddings", options).argv

    # argparse keeps the last: the module's own flag beats --concurrency beats --quick's
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--levels"] == ["1,64", "1,8,64", "2"]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--duration-s"] == ["3", "7.5"]


def test_a_module_that_takes_one_level_gets_the_highest_and_faults_get_the_window_twice() -> None:
    options = BenchOptions(duration_s=5, concurrency=(1, 8, 32))

    assert step_for("sharding", options).argv[-2:] == ("--concurrency", "32")
    assert step_for("autoscaling", options).argv[-2:] == ("--callers", "32")
    faults = step_for("faults", options).argv
    assert faults[2:] == ("--before-s", "5", "--after-s", "5", "--kill-concurrency", "32")
    assert step_for("training", options).argv == ("-m", "benchmarks.training")  # steps, not time


def test_all_runs_the_gpu_benchmark_only_on_cuda_and_cuda_asks_training_for_its_preset() -> None:
    on_cpu = [step.name for step in plan(["all"], BenchOptions())]
    on_cuda = plan(["all", "training"], BenchOptions(device="cuda"))

    assert on_cpu == ["embeddings", "generation", "training", "ensemble", "sharding"] + [
        "faults",
        "autoscaling",
        "transports",
        "evaluation",
    ]
    assert [step.name for step in on_cuda][-1] == "gpu"  # training named twice runs once
    assert len(on_cuda) == 10
    training = next(step for step in on_cuda if step.name == "training")
    assert "--gpu" in training.argv
    assert training.env == {}
    gpu = on_cuda[-1]
    assert gpu.out_is_folder
    assert gpu.raw == "raw/gpu/gpu.json"
    assert gpu.command("py", "RUN")[-2:] == ["--out", "RUN/raw/gpu"]


def test_module_flags_cannot_go_to_several_benchmarks_at_once() -> None:
    with pytest.raises(ValueError, match="one benchmark"):
        plan(["all"], BenchOptions(module_args=("--skip-plain",)))


def test_a_module_that_wrote_its_json_and_exited_1_is_reported_with_a_note() -> None:
    raw = json.loads((RECORDED / "gpu_shape_h100.json").read_text())
    step = step_for("gpu", BenchOptions(device="cuda"))

    finished = section_for(step, raw, returncode=1, tail="...")
    stopped = section_for(step, raw, returncode=None, tail="killed")
    nothing = section_for(step, None, returncode=1, tail="Traceback: boom")

    assert finished.status != "failed"
    assert finished.figures
    assert any("exited with status 1" in note for note in finished.notes)
    assert stopped.status == "failed"
    assert stopped.figures
    assert "stopped before it finished" in (stopped.error or "")
    assert nothing.status == "failed"
    assert "boom" in (nothing.error or "")
    assert "no JSON written" in (nothing.error or "")


def fake_module(name: str, source: str) -> Step:
    """A step whose 'module' is a short script: the real runner, logs and extractor around
    it, without starting a benchmark."""
    return Step(
        name=name,
        argv=("-c", textwrap.dedent(source)),
        raw=f"raw/{name}/gpu.json",
        out_is_folder=True,
    )


def test_a_run_writes_its_folder_and_reports_a_failed_benchmark_beside_the_rest(
    tmp_path: Path,
) -> None:
    recorded = RECORDED / "gpu_shape_h100.json"
    good = fake_module(
        "gpu",
        f"""
        import pathlib, shutil, sys
        out = pathlib.Path(sys.argv[-1])
        out.mkdir(parents=True)
        print("matmul: bf16 ...", flush=True)
        shutil.copy({str(recorded)!r}, out / "gpu.json")
        """,
    )
    broken = Step(
        name="training",
        argv=("-c", "import sys; print('loading...'); sys.exit('no CUDA here')"),
        raw="raw/missing.json",
    )
    run_dir = tmp_path / "run"

    status = cli.run(
        [good, broken],
        BenchOptions(),
        run_dir,
        command=["loom", "bench", "gpu"],
        started=cli.dt.datetime(2026, 12, 6, tzinfo=cli.dt.UTC),
        measure_ceiling=lambda: {"requests_per_s": 5000.0},
    )

    assert status == 1  # one benchmark failed: the run says so, and still reports the other
    result = json.loads((run_dir / "result.json").read_text())
    assert [s["status"] for s in result["sections"]] == ["ok", "failed"]
    assert "no CUDA here" in result["sections"][1]["error"]
    names = {figure["name"] for figure in result["figures"]}
    assert names
    assert all(name.startswith("gpu.") for name in names)
    assert result["machine"]["cpu_count"]
    assert "git_commit" in result["machine"]
    assert result["command"] == ["loom", "bench", "gpu"]
    assert result["loadgen_ceiling"] == {"requests_per_s": 5000.0}
    assert set(result["plots"]) <= {p.name for p in run_dir.glob("*.png")}
    assert "matmul: bf16" in (run_dir / "logs" / "gpu.log").read_text()
    report = (run_dir / "report.md").read_text()
    assert "| figure | value | unit | goal |" in report
    assert "no CUDA here" in report


def test_report_redraws_a_run_from_its_raw_json_and_keeps_failures(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "raw" / "gpu").mkdir(parents=True)
    shutil.copy(RECORDED / "gpu_shape_h100.json", run_dir / "raw" / "gpu" / "gpu.json")
    result = {
        "command": ["loom", "bench", "gpu"],
        "started_utc": "2026-12-06T00:00:00+00:00",
        "wall_s": 10.0,
        "machine": {},
        "figures": [],
        "sections": [
            {"name": "gpu", "raw": "raw/gpu/gpu.json", "wall_s": 9.0, "command": ["python"]},
            {"name": "training", "status": "failed", "error": "exit status 1"},
        ],
    }
    (run_dir / "result.json").write_text(json.dumps(result))

    assert cli.main(["report", str(run_dir)]) == 0

    redrawn = json.loads((run_dir / "result.json").read_text())
    assert [s["status"] for s in redrawn["sections"]] == ["ok", "failed"]
    assert redrawn["figures"]
    assert redrawn["sections"][0]["wall_s"] == 9.0
    assert (run_dir / "report.md").is_file()


def test_compare_exits_1_below_the_gate_and_0_above_it(capsys: pytest.CaptureFixture[str]) -> None:
    a, b = str(RECORDED / "run_a.json"), str(RECORDED / "run_b.json")

    assert loom_main(["bench", "compare", a, b, "--fail-below", "0.9"]) == 1
    failing = capsys.readouterr().out
    assert loom_main(["bench", "compare", a, b, "--fail-below", "0.8"]) == 0
    assert loom_main(["bench", "compare", a, b]) == 0

    assert "below 0.9: stack_rps_c64 0.85x" in failing  # 170 / 200 req/s
    assert "stack_rps_c64" in capsys.readouterr().out


def test_compare_and_run_refuse_bad_input_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "result.json").write_text("{}")
    a = str(RECORDED / "run_a.json")

    assert loom_main(["bench", "compare", a, str(tmp_path / "nowhere")]) == 2
    assert loom_main(["bench", "compare", a, a, "--fail-below", "0"]) == 2
    assert loom_main(["bench", "embeddings", "--out", str(tmp_path / "busy")]) == 2
    assert loom_main(["bench", "all", "--", "--skip-plain"]) == 2
    errors = capsys.readouterr().err
    assert "cannot read it" in errors
    assert "not empty" in errors
    assert "one benchmark" in errors
    with pytest.raises(SystemExit) as exit_:
        loom_main(["bench", "embeddings", "--concurrency", "0,8"])
    assert exit_.value.code == 2


def test_the_command_is_recorded_as_typed_whichever_way_it_was_started() -> None:
    as_loom = ["/x/loom", "bench", "embeddings", "--quick"]
    as_module = ["/x/benchmarks/cli.py", "embeddings", "--quick"]

    assert cli.typed_command("embeddings", as_loom) == ["loom", "bench", "embeddings", "--quick"]
    assert cli.typed_command("embeddings", as_module) == cli.typed_command("embeddings", as_loom)


def test_a_request_rate_near_the_load_generators_ceiling_is_refused_with_a_note() -> None:
    section = Section(name="embeddings")
    section.figure("stack_rps_c64", 850.0, "req/s")  # 850 >= 0.8 x 1000: the client's limit
    section.figure("plain_rps_c64", 790.0, "req/s")
    section.figure("engine_texts_per_s", 5000.0, "texts/s")  # in-process: no client

    refused = refuse_near_ceiling([section], ceiling_rps=1000.0)

    assert refused == ["embeddings.stack_rps_c64"]
    assert [f.name for f in section.figures] == [
        "embeddings.plain_rps_c64",
        "embeddings.engine_texts_per_s",
    ]
    assert "load generator's own ceiling (1000 req/s" in section.notes[0]


def test_all_quick_leaves_out_evaluation_and_the_logprobs_turns_a_full_run_has() -> None:
    quick = plan(["all"], BenchOptions(quick=True))
    full = plan(["all"], BenchOptions())
    assert "evaluation" not in [step.name for step in quick]
    assert "evaluation" in [step.name for step in full]
    generation = next(step for step in quick if step.name == "generation")
    only = generation.argv[generation.argv.index("--only") + 1]
    assert "logprobs" not in only.split(",")
    assert "stack" in only.split(",")
    named = plan(["evaluation"], BenchOptions(quick=True))  # by name it still runs
    assert [step.name for step in named] == ["evaluation"]
