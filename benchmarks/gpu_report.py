"""A GPU run (``benchmarks.gpu``'s ``gpu.json``) as report data: one ``Section`` named
``gpu`` with its headline figures, a table per part and two charts. Pure: it reads the
recorded JSON only, so a finished run can be reported again anywhere.

    section, = sections(json.loads(Path("run/gpu.json").read_text()))
    [f.name for f in section.figures]   # gpu.matmul_bf16_tflops, gpu.training_small_bf16_mfu, ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from benchmarks.result import Chart, Section, Table, ratio, rounded

RAW_FILE = "gpu.json"
RESULT_FILE = "result.json"
MFU_GOAL = 0.40
"""Model-FLOPs utilisation the training loop should reach on H100/H200-class GPUs."""
MFU_GOAL_PARTS = ("H100", "H200")
"""The GPUs (by their data-sheet name in ``peak_basis``) the MFU goal is set for."""


def _label(entry: Mapping[str, Any]) -> str:
    keys = ("dtype", "batch_size", "preset", "compiled")
    return " ".join(f"{key}={entry[key]}" for key in keys if key in entry)


def _entries(part: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A part's measurements: its ``results`` or ``runs`` list."""
    return list(part.get("results", [])) + list(part.get("runs", []))


def part_errors(raw: Mapping[str, Any]) -> list[str]:
    """Every error the run recorded, a part's own or one measurement's, as ``part: text``."""
    errors = []
    for name, part in raw.get("parts", {}).items():
        if "error" in part:
            errors.append(f"{name}: {part['error']}")
        errors += [f"{name} {_label(e)}: {e['error']}" for e in _entries(part) if "error" in e]
    return errors


def _ok(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in entries if "error" not in e and "skipped" not in e]


def _device_table(raw: Mapping[str, Any]) -> Table:
    gpu = raw.get("machine", {}).get("gpu", {})
    names = ", ".join(d["name"] for d in gpu.get("devices", [])) or "none"
    rows = [
        ("device asked for", raw.get("device")),
        ("GPUs", names),
        ("driver", gpu.get("driver_version")),
        ("CUDA (torch)", gpu.get("torch_cuda")),
        ("torch", gpu.get("torch")),
        ("transformers", gpu.get("transformers")),
        ("quick", raw.get("quick")),
    ]
    return Table(title="GPU run: device and versions", columns=("fact", "value"), rows=rows)


def _matmul(section: Section, part: Mapping[str, Any]) -> None:
    table = Table(
        title="Matmul ceiling: n x n @ n x n, 2 n^3 FLOPs each",
        columns=("dtype", "n", "TFLOP/s", "ms per matmul"),
    )
    for r in _ok(part["results"]):
        section.figure(f"matmul_{r['dtype']}_tflops", r["tflops"], "TFLOP/s")
        table.rows.append(
            (r["dtype"], r["size"], rounded(r["tflops"], 1), rounded(r["ms_per_matmul"], 3))
        )
    section.tables.append(table)


def _embeddings(section: Section, part: Mapping[str, Any]) -> None:
    results = _ok(part["results"])
    table = Table(
        title="Embeddings engine (bundled MiniLM): one engine.run per batch, tokenising and "
        "the copy to the CPU included",
        columns=(
            "dtype",
            "batch",
            "texts/s",
            "p50 ms",
            "p95 ms",
            "padded tokens/batch",
            "model TFLOP/s",
            "share of matmul ceiling",
        ),
        note=f"model FLOPs per batch: {part.get('flops_formula')}",
    )
    chart = Chart(
        file="gpu-embeddings-throughput.png",
        title="Embeddings engine: texts/s by batch size",
        x_label="batch size (texts)",
        y_label="texts/s",
        log_x=True,
    )
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        rows = sorted((r for r in results if r["dtype"] == dtype), key=lambda r: r["batch_size"])
        chart.series[dtype] = [(r["batch_size"], r["texts_per_s"]) for r in rows]
        largest = rows[-1]
        name = f"embeddings_{dtype}_b{largest['batch_size']}"
        section.figure(f"{name}_texts_per_s", largest["texts_per_s"], "texts/s")
        section.figure(f"{name}_ceiling_share", largest["ceiling_share"], "share")
        if rows[0]["batch_size"] == 1:
            section.figure(f"embeddings_{dtype}_b1_p50_ms", rows[0]["p50_ms"], "ms", better="lower")
        table.rows += [
            (
                dtype,
                r["batch_size"],
                rounded(r["texts_per_s"], 1),
                rounded(r["p50_ms"], 2),
                rounded(r["p95_ms"], 2),
                rounded(r["padded_tokens_per_batch"], 1),
                rounded(r["model_tflops"], 3),
                rounded(r["ceiling_share"], 3),
            )
            for r in rows
        ]
    section.tables.append(table)
    if chart.series:
        section.charts.append(chart)


def _split(section: Section, part: Mapping[str, Any]) -> None:
    table = Table(
        title="Model-parallel split (models.parallel) against one device, same texts",
        columns=(
            "dtype",
            "devices",
            "max |diff|",
            "tolerance",
            "equal",
            "one device texts/s",
            "split texts/s",
            "split / one",
        ),
    )
    for r in _ok(part["results"]):
        speed = ratio(r["split_texts_per_s"], r["single_texts_per_s"])
        diff_name = f"split_{r['dtype']}_max_abs_diff"
        section.figure(diff_name, r["max_abs_diff"], "", better="lower", goal=r["tolerance"])
        section.figure(f"split_{r['dtype']}_vs_single", speed, "x")
        table.rows.append(
            (
                r["dtype"],
                " + ".join(r["devices"]),
                f"{r['max_abs_diff']:.2e}",
                r["tolerance"],
                r["equal"],
                rounded(r["single_texts_per_s"], 1),
                rounded(r["split_texts_per_s"], 1),
                rounded(speed, 3),
            )
        )
    section.tables.append(table)


def _generation(section: Section, part: Mapping[str, Any]) -> None:
    sequential, levels = part["sequential"], part["continuous"]
    model = part.get("model", {})
    table = Table(
        title="Generation: continuous batching (GenerationEngine) against sequential "
        "model.generate",
        columns=("variant", "concurrency", "tokens/s", "TTFT p50 ms", "requests"),
        note=f"random GPT-2, {model.get('params', 0) / 1e6:.1f} M parameters, "
        f"{model.get('dtype')}; {part.get('method')}",
    )
    section.figure("generation_sequential_tokens_per_s", sequential["tokens_per_s"], "tokens/s")
    table.rows.append(
        (
            "sequential generate",
            1,
            rounded(sequential["tokens_per_s"], 1),
            rounded(sequential["ttft_p50_ms"], 1),
            sequential["requests"],
        )
    )
    for level in levels:
        c = level["concurrency"]
        section.figure(f"generation_cb_c{c}_tokens_per_s", level["tokens_per_s"], "tokens/s")
        table.rows.append(
            (
                "continuous batching",
                c,
                rounded(level["tokens_per_s"], 1),
                rounded(level["ttft_p50_ms"], 1),
                level["requests"],
            )
        )
    if levels:
        top = max(levels, key=lambda level: level["concurrency"])
        section.figure(
            "generation_cb_vs_sequential",
            ratio(top["tokens_per_s"], sequential["tokens_per_s"]),
            "x",
        )
        section.charts.append(
            Chart(
                file="gpu-generation-throughput.png",
                title="Generation: tokens/s by concurrency",
                x_label="concurrency (closed-loop clients)",
                y_label="tokens/s",
                series={
                    "continuous batching": [(v["concurrency"], v["tokens_per_s"]) for v in levels]
                },
                hlines={"sequential generate": sequential["tokens_per_s"]},
                log_x=True,
            )
        )
    section.tables.append(table)


def _training(section: Section, part: Mapping[str, Any]) -> None:
    runs = _ok(part["runs"])
    table = Table(
        title="Training: the lm trainer's loop alone (rate, loss, backward, clip, AdamW)",
        columns=(
            "preset",
            "dtype",
            "compiled",
            "tokens/step",
            "tokens/s",
            "model TFLOP/s",
            "MFU",
            "MFU against",
            "share of matmul ceiling",
            "final loss",
        ),
        note=f"model FLOPs: {part.get('flops_formula')}",
    )
    for run in runs:
        table.rows.append(
            (
                run["preset"],
                run["dtype"],
                run["compiled"],
                run["tokens_per_step"],
                rounded(run["tokens_per_s"], 0),
                rounded(run["model_tflops"], 3),
                rounded(run["mfu"], 3),
                run["peak_basis"],
                rounded(run["ceiling_share"], 3),
                rounded(run["final_loss"], 2),
            )
        )
    for key in dict.fromkeys((r["preset"], r["dtype"]) for r in runs):
        best = max((r for r in runs if (r["preset"], r["dtype"]) == key), key=_tokens_per_s)
        name = f"training_{key[0]}_{key[1]}"
        section.figure(f"{name}_tokens_per_s", best["tokens_per_s"], "tokens/s")
        goal = MFU_GOAL if any(p in best["peak_basis"] for p in MFU_GOAL_PARTS) else None
        section.figure(f"{name}_mfu", best["mfu"], "share", goal=goal)
        if goal is None and best["mfu"] is not None:
            section.notes.append(
                f"training: MFU of {key[0]} {key[1]} is against {best['peak_basis']}; the "
                f">= {MFU_GOAL:.0%} goal is set for H100/H200-class GPUs only"
            )
    section.tables.append(table)


def _tokens_per_s(run: Mapping[str, Any]) -> float:
    return float(run["tokens_per_s"])


_PARTS: tuple[tuple[str, Callable[[Section, Mapping[str, Any]], None]], ...] = (
    ("matmul", _matmul),
    ("embeddings", _embeddings),
    ("split", _split),
    ("generation", _generation),
    ("training", _training),
)


def sections(raw: Mapping[str, Any]) -> list[Section]:
    """The run as one ``Section`` named ``gpu``: ``failed`` (with every error) when a part or a
    measurement failed, ``skipped`` when every part was, else ``ok``; what was skipped and why
    in its notes."""
    section = Section(
        name="gpu", command=list(raw.get("command", [])), wall_s=raw.get("wall_s"), raw=RAW_FILE
    )
    section.tables.append(_device_table(raw))
    parts = raw.get("parts", {})
    for name, add in _PARTS:
        part = parts.get(name)
        if part is None:
            continue
        for key in ("skipped", "error"):
            if key in part:
                section.notes.append(f"{name}: {key}: {part[key]}")
        if part.get("unfinished"):
            section.notes.append(f"{name}: unfinished: the run ended during this part")
        section.notes += [
            f"{name} {_label(e)}: {key}: {e[key]}"
            for e in _entries(part)
            for key in ("skipped", "error")
            if key in e
        ]
        if "skipped" not in part and "error" not in part:
            add(section, part)
    errors = part_errors(raw)
    if errors:
        section.status, section.error = "failed", "; ".join(errors)
    elif parts and all("skipped" in part for part in parts.values()):
        section.status = "skipped"
    return [section]
