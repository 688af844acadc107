"""``benchmarks.gpu``: its CPU path runs end to end with Ray, FastAPI, uvicorn and Starlette
made unimportable (what a GPU node without them sees); its report section is built from a
hand-written ``gpu.json`` in the shape a 2-GPU H100 node gives (``recorded/gpu_shape_h100.json``:
made-up numbers, not a measurement; no GPU run has happened yet); its measurements'
arithmetic and the model split's comparison hold on the CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.generation_model import GenerationRequest
from benchmarks.gpu import PARTS, main
from benchmarks.gpu_measure import (
    EncoderShape,
    SplitConfig,
    batch_flops,
    drive_closed_loop,
    encoder_shape,
    measure_matmul,
    measure_split,
)
from benchmarks.gpu_report import sections
from benchmarks.result import Section, as_json, section_from_json
from benchmarks.training_mfu import lm_flops_per_token, peak_bf16_flops
from models.bundled import bundled_model_dir
from models.engines.generate import SamplingParams, SequenceUpdate
from training.trainers import lm

REPO = Path(__file__).resolve().parents[3]
RECORDED = Path(__file__).parent / "recorded" / "gpu_shape_h100.json"
BLOCKED = ("ray", "fastapi", "uvicorn", "starlette")

# Installed as sitecustomize.py on the child's PYTHONPATH: every import of a blocked package,
# or of a module inside one, raises ModuleNotFoundError, as on a node where none is installed.
BLOCKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    BLOCKED = {blocked!r}


    class BlockGpuNodeAbsentees:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None


    sys.meta_path.insert(0, BlockGpuNodeAbsentees())
    Path(__file__).with_name("blocker-active").write_text("yes")
    """
)


def blocked_env(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "blocker"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=BLOCKED))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def recorded() -> dict[str, Any]:
    return json.loads(RECORDED.read_text())


def gpu_section(raw: dict[str, Any]) -> Section:
    (section,) = sections(raw)
    return section


def figures(section: Section) -> dict[str, Any]:
    return {figure.name.removeprefix("gpu."): figure for figure in section.figures}


# ---- the whole run, on the CPU, with the serving stack unimportable --------------------------


def test_the_blocker_makes_ray_fastapi_uvicorn_and_starlette_unimportable(tmp_path: Path) -> None:
    env = blocked_env(tmp_path)
    for name in BLOCKED:
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 1, name
        assert "ModuleNotFoundError" in done.stderr


def test_a_quick_cpu_run_needs_none_of_the_serving_stack_and_records_every_part(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(out)],
        env=blocked_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "blocker" / "blocker-active").read_text() == "yes"
    raw = json.loads((out / "gpu.json").read_text())
    parts = raw["parts"]
    assert list(parts) == list(PARTS)
    assert "CUDA" in parts["split"]["skipped"]  # a cuda-only part says why it did not run
    small, tiny = parts["training"]["runs"]
    assert small == {"preset": "small", "dtype": "bf16", "skipped": "needs CUDA"}
    assert tiny["preset"] == "tiny"
    assert tiny["tokens_per_s"] > 0
    assert tiny["mfu"] > 0
    assert tiny["peak_basis"] == "measured fp32 matmul ceiling"
    assert [r["dtype"] for r in parts["matmul"]["results"]] == ["fp32"]
    assert parts["matmul"]["results"][0]["tflops"] > 0
    embeddings = parts["embeddings"]["results"]
    assert [(r["dtype"], r["batch_size"]) for r in embeddings] == [("fp32", 1), ("fp32", 8)]
    assert all(r["texts_per_s"] > 0 and r["ceiling_share"] > 0 for r in embeddings)
    generation = parts["generation"]
    assert generation["sequential"]["tokens_per_s"] > 0
    assert [level["concurrency"] for level in generation["continuous"]] == [1, 4]
    assert raw["machine"]["gpu"]["cuda_available"] is False

    result = json.loads((out / "result.json").read_text())
    assert result["command"][:3] == ["python", "-m", "benchmarks.gpu"]
    (section,) = result["sections"]
    assert section["name"] == "gpu"
    assert section["status"] == "ok"
    names = {figure["name"] for figure in result["figures"]}
    assert {
        "gpu.matmul_fp32_tflops",
        "gpu.embeddings_fp32_b8_texts_per_s",
        "gpu.embeddings_fp32_b8_ceiling_share",
        "gpu.generation_cb_vs_sequential",
        "gpu.training_tiny_fp32_mfu",
    } <= names
    assert any("split: skipped" in note for note in section["notes"])


def test_asking_for_cuda_where_there_is_none_skips_every_part_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 0

    raw = json.loads((tmp_path / "gpu.json").read_text())
    assert {
        name: "CUDA is not available" in p["skipped"] for name, p in raw["parts"].items()
    } == dict.fromkeys(PARTS, True)
    (section,) = json.loads((tmp_path / "result.json").read_text())["sections"]
    assert section["status"] == "skipped"
    assert section["figures"] == []


# ---- the report section, from a recorded H100 run ---------------------------------------------


def test_a_recorded_h100_run_gives_the_headline_figures_with_their_units() -> None:
    found = figures(gpu_section(recorded()))

    assert found["matmul_bf16_tflops"].value == 712.8
    assert found["matmul_tf32_tflops"].unit == "TFLOP/s"
    assert found["embeddings_fp16_b1024_texts_per_s"].value == 41000.0  # the largest batch
    assert found["embeddings_fp16_b1024_ceiling_share"].value == 0.02294
    assert found["embeddings_bf16_b1_p50_ms"].better == "lower"
    assert found["generation_sequential_tokens_per_s"].value == 212.5
    assert found["generation_cb_c64_tokens_per_s"].value == 7920.5
    # continuous batching at the highest concurrency over sequential generate: 7920.5 / 212.5
    assert found["generation_cb_vs_sequential"].value == pytest.approx(37.27, abs=0.01)
    assert found["generation_cb_vs_sequential"].unit == "x"
    assert found["split_fp16_vs_single"].value == pytest.approx(32400 / 36000)


def test_training_mfu_takes_the_faster_variant_and_meets_the_h100_goal() -> None:
    found = figures(gpu_section(recorded()))

    mfu = found["training_small_bf16_mfu"]
    # compiled: 4.3 M tokens/s x 96,915,456 FLOPs/token = 416.7 TFLOP/s; / 989 = 0.4214
    assert mfu.value == 0.4214
    assert (mfu.goal, mfu.met) == (">= 0.4", True)
    assert found["training_small_bf16_tokens_per_s"].value == 4_300_000.0


def test_training_mfu_below_forty_percent_misses_the_goal() -> None:
    raw = recorded()
    raw["parts"]["training"]["runs"] = raw["parts"]["training"]["runs"][:1]  # eager only

    mfu = figures(gpu_section(raw))["training_small_bf16_mfu"]

    assert (mfu.value, mfu.goal, mfu.met) == (0.2842, ">= 0.4", False)


def test_the_mfu_goal_is_set_only_for_h100_and_h200_class_gpus() -> None:
    raw = recorded()
    for run in raw["parts"]["training"]["runs"]:
        run["peak_basis"] = "measured bf16 matmul ceiling"  # a GPU with no data-sheet entry

    section = gpu_section(raw)

    mfu = figures(section)["training_small_bf16_mfu"]
    assert (mfu.goal, mfu.met) == (None, None)
    assert any("H100/H200-class GPUs only" in note for note in section.notes)


def test_the_split_figures_hold_each_dtype_to_its_tolerance() -> None:
    raw = recorded()
    raw["parts"]["split"]["results"][1]["max_abs_diff"] = 0.004  # fp16 past its 2e-3

    found = figures(gpu_section(raw))

    assert (found["split_fp32_max_abs_diff"].goal, found["split_fp32_max_abs_diff"].met) == (
        "<= 1e-05",
        True,
    )
    assert (found["split_fp16_max_abs_diff"].value, found["split_fp16_max_abs_diff"].met) == (
        0.004,
        False,
    )


def test_the_charts_plot_texts_per_s_by_batch_per_dtype_and_generation_by_concurrency() -> None:
    embeddings, generation = gpu_section(recorded()).charts

    assert (embeddings.kind, embeddings.log_x) == ("line", True)
    assert list(embeddings.series) == ["fp16", "bf16"]
    assert [x for x, _ in embeddings.series["fp16"]] == [1, 8, 32, 128, 512, 1024]
    assert embeddings.series["bf16"][-1] == (1024, 40200.0)
    assert generation.series["continuous batching"][0] == (1, 180.3)
    assert generation.hlines == {"sequential generate": 212.5}


def test_every_part_has_a_table_and_the_section_reads_back_from_its_json() -> None:
    section = gpu_section(recorded())

    titles = [table.title.split(":")[0].split(" (")[0] for table in section.tables]
    assert titles == [
        "GPU run",
        "Matmul ceiling",
        "Embeddings engine",
        "Model-parallel split",
        "Generation",
        "Training",
    ]
    assert dict(section.tables[0].rows)["GPUs"] == "NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3"
    assert section.status == "ok"
    assert section.raw == "gpu.json"
    assert section_from_json(as_json(section)) == section


def test_a_failed_measurement_fails_the_section_but_keeps_the_other_figures() -> None:
    raw = recorded()
    raw["parts"]["embeddings"]["results"].append(
        {"dtype": "fp16", "batch_size": 4096, "error": "OutOfMemoryError: CUDA out of memory"}
    )
    raw["parts"]["generation"] = {"error": "RuntimeError: request 3 failed"}

    section = gpu_section(raw)

    assert section.status == "failed"
    assert section.error is not None
    assert "batch_size=4096" in section.error
    assert "generation: RuntimeError" in section.error
    found = figures(section)
    assert "embeddings_fp16_b1024_texts_per_s" in found  # b1024 still the largest measured
    assert not any(name.startswith("generation_") for name in found)


def test_a_skipped_part_is_a_note_not_a_failure() -> None:
    raw = recorded()
    raw["parts"]["split"] = {"skipped": "needs 2 CUDA devices; 1 here"}

    section = gpu_section(raw)

    assert section.status == "ok"
    assert "split: skipped: needs 2 CUDA devices; 1 here" in section.notes
    assert not any(name.startswith("split_") for name in figures(section))


def test_a_part_the_run_ended_in_keeps_its_finished_runs_and_says_so() -> None:
    raw = recorded()
    training = raw["parts"]["training"]
    training["runs"] = training["runs"][:1]  # eager done; cut short while compiling
    training["unfinished"] = True

    section = gpu_section(raw)

    assert figures(section)["training_small_bf16_mfu"].value == 0.2842
    assert "training: unfinished: the run ended during this part" in section.notes


# ---- the measurements' arithmetic -------------------------------------------------------------


def test_encoder_flops_count_the_layer_matmuls_and_attention_at_the_padded_length() -> None:
    minilm = EncoderShape(layers=6, hidden=384, layer_params=10_646_784)

    # 2 x 10,646,784 x (1024 x 16) + 4 x 6 x 384 x 16^2 x 1024
    assert batch_flops(minilm, batch_size=1024, padded_len=16) == 348_873_818_112 + 2_415_919_104


def test_the_bundled_encoders_shape_is_read_from_its_config_without_loading_weights() -> None:
    shape = encoder_shape(bundled_model_dir())

    # one BERT layer at H = 384, I = 1536: attention 4 H^2 + 4 H, feed-forward 2 H I + I + H,
    # two layer norms 4 H: 591,360 + 1,181,568 + 1,536 = 1,774,464; six of them
    assert shape == EncoderShape(layers=6, hidden=384, layer_params=6 * 1_774_464)


def test_lm_flops_per_token_leave_out_the_position_table_only() -> None:
    preset = lm.lm_preset("tiny")
    model = lm.build_lm(preset, vocab_size=4096, seq_len=128, seed=0)

    flops, matmul_params = lm_flops_per_token(model, preset, seq_len=128)

    assert matmul_params == 953_856 - 256 * 128  # all parameters less wpe (256 x 128)
    assert flops == 6 * 921_088 + 12 * 2 * 128 * 128  # 5,526,528 + 393,216


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", (989e12, "H100 SXM")),
        ("NVIDIA H100 PCIe", (756e12, "H100 PCIe")),
        ("NVIDIA H100 NVL", (835e12, "H100 NVL")),
        ("NVIDIA H200", (989e12, "H200 SXM")),
        ("Tesla T4", None),
    ],
)
def test_the_data_sheet_peak_is_found_by_the_gpus_name(
    name: str, peak: tuple[float, str] | None
) -> None:
    assert peak_bf16_flops(name) == peak


def test_a_cpu_matmul_is_timed_over_at_least_three_calls() -> None:
    result = measure_matmul(torch.device("cpu"), "fp32", size=64, min_time_s=0.01)

    assert result["reps"] >= 3
    assert result["tflops"] == pytest.approx(2 * 64**3 * result["reps"] / result["seconds"] / 1e12)


def test_the_split_model_gives_the_same_vectors_as_one_device_on_two_cpu_stages() -> None:
    config = SplitConfig(dtypes=("fp32",), batch_size=4, duration_s=0.05)

    (result,) = measure_split(bundled_model_dir(), ["cpu", "cpu"], config)["results"]

    assert result["equal"] is True
    assert result["max_abs_diff"] <= 1e-5
    assert result["single_texts_per_s"] > 0
    assert result["split_texts_per_s"] > 0


class FakeGenerationEngine:
    """Finishes each sequence with all its tokens after a short delay, on a timer thread, and
    notes the most sequences it ever held at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def submit(
        self, prompt: str, params: SamplingParams, *, on_update: Callable[[SequenceUpdate], None]
    ) -> str:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def finish() -> None:
            with self._lock:
                self.in_flight -= 1
            on_update(SequenceUpdate(prompt, "text", params.max_tokens, finish_reason="length"))

        threading.Timer(0.01, finish).start()
        return prompt


def test_the_closed_loop_keeps_c_requests_in_flight_until_the_last_is_sent() -> None:
    engine = FakeGenerationEngine()
    requests = [GenerationRequest(f"prompt {i}", max_tokens=10 + i) for i in range(4)]

    timings, start_ns, last_send_ns = drive_closed_loop(
        engine, requests, concurrency=2, total=7, timeout_s=10
    )

    assert engine.most_in_flight == 2
    assert len(timings) == 7
    # requests cycle: 10, 11, 12, 13, 10, 11, 12 tokens = 79
    assert sum(t.tokens for t in timings) == 79
    assert start_ns < max(t.sent_ns for t in timings) <= last_send_ns


def test_the_recorded_run_is_unchanged_by_building_its_section() -> None:
    raw = recorded()
    before = copy.deepcopy(raw)

    sections(raw)

    assert raw == before


# ---- on a GPU (benchmarks/gpu_check.sh runs these; skipped elsewhere) ------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_events_time_a_matmul_at_a_plausible_rate() -> None:
    result = measure_matmul(torch.device("cuda", 0), "fp16", size=2048, min_time_s=0.05)

    # 2 x 2048^3 = 17.2 GFLOP a call: any CUDA GPU does more than 1 TFLOP/s in fp16, and no
    # GPU today does 5000 (a timer reading near zero would say so)
    assert 1 < result["tflops"] < 5000


@pytest.mark.gpu
@needs_cuda
def test_the_split_model_gives_the_same_vectors_on_two_stages_of_one_gpu() -> None:
    config = SplitConfig(dtypes=("fp32", "fp16"), batch_size=64, duration_s=0.1)

    results = measure_split(bundled_model_dir(), ["cuda:0", "cuda:0"], config)["results"]

    assert [(r["dtype"], r["equal"]) for r in results] == [("fp32", True), ("fp16", True)]
