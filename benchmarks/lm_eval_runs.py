"""lm-evaluation-harness run as its users run it: the ``lm_eval`` command, on the repository's
tasks (``training/eval_tasks``: ``loom_mc``, multiple choice by loglikelihood; ``loom_gen``,
``generate_until``), either against a running Loom (``--model local-completions``: token-id
prompts to ``/v1/completions``, scored from ``echo`` + ``logprobs``) or in-process on the same
weights (``--model hf``). Offline: the tasks read local JSONL, the tokenizer and weights come
from a local folder, and the Hugging Face libraries are told never to reach a hub.

    loom = local_completions(LoomEndpoint(url=url, model="tinygpt", tokenizer_dir=folder))
    run = run_lm_eval(loom, tasks=(MC_TASK, GEN_TASK), output_dir=tmp, env=offline_env(tmp))
    run.metric(MC_TASK, "acc")             # 0.5
    run.loglikelihoods(MC_TASK)[0]         # [-4.70, -19.13, -14.11, -23.91]: one per choice

Shared by the e2e test (``tests/e2e/test_lm_eval_e2e.py``) and the wall-time benchmark
(``benchmarks.evaluation``), so both run lm-eval the way ``docs/training.md`` shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO_ROOT / "training" / "eval_tasks"
"""lm-eval's ``--include_path`` for the repository's tasks. Their ``data_files`` are relative
to the repository root, so lm-eval runs there (``cwd``)."""
MC_TASK = "loom_mc"
GEN_TASK = "loom_gen"
MC_METRIC = "acc"
GEN_METRIC = "exact_match"

_HUB_OFFLINE = {
    # datasets, transformers and huggingface_hub: local files only, never a download
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # `local-completions` posts with `requests` when num_concurrent is 1, which honours
    # http_proxy: the server is on this machine
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def offline_env(
    hf_home: Path, *, api_key: str | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment for an ``lm_eval`` run: hubs off, caches (datasets' Arrow
    files of the tasks) under ``hf_home``, and ``OPENAI_API_KEY`` set to ``api_key``, which
    ``local-completions`` sends as ``Authorization: Bearer <key>`` (none: no key is sent)."""
    env = dict(os.environ if environ is None else environ)
    env.pop("OPENAI_API_KEY", None)
    env |= _HUB_OFFLINE | {"HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    if api_key is not None:
        env["OPENAI_API_KEY"] = api_key
    return env


@dataclass(frozen=True, kw_only=True)
class LoomEndpoint:
    """A Loom serving a ``task: generate`` model, as ``local-completions`` calls it."""

    url: str
    """The server's base URL (``http://127.0.0.1:8000``); lm-eval posts to ``/v1/completions``."""
    model: str
    """The served model name (the request's ``model``)."""
    tokenizer_dir: Path
    """The model's folder (its stored version): lm-eval tokenizes locally and sends token ids,
    so contexts and continuations split exactly where the ``hf`` model splits them."""
    num_concurrent: int = 2
    """Requests in flight at once (lm-eval's asyncio client; Loom batches them)."""
    batch_size: int = 1
    """Prompts per request (a list of token-id lists)."""
    max_length_tokens: int = 1024
    """The model's context; lm-eval left-truncates to this less one."""
    max_retries: int = 2
    timeout_s: int = 120


@dataclass(frozen=True, kw_only=True)
class LmEvalModel:
    """What follows ``--model``, ``--model_args``, ``--device`` and ``--batch_size``."""

    name: str
    args: str
    device: str | None = None
    batch_size: int = 1


def local_completions(endpoint: LoomEndpoint) -> LmEvalModel:
    """lm-eval's OpenAI-compatible completions client pointed at Loom, tokenizing locally."""
    args = {
        "base_url": f"{endpoint.url}/v1/completions",
        "model": endpoint.model,
        "tokenizer_backend": "huggingface",
        "tokenizer": str(endpoint.tokenizer_dir),
        "tokenized_requests": "True",
        "num_concurrent": str(endpoint.num_concurrent),
        "max_retries": str(endpoint.max_retries),
        "max_length": str(endpoint.max_length_tokens),
        "timeout": str(endpoint.timeout_s),
    }
    return LmEvalModel(
        name="local-completions",
        args=",".join(f"{key}={value}" for key, value in args.items()),
        batch_size=endpoint.batch_size,
    )


def hf_in_process(model_dir: Path, *, device: str = "cpu", batch_size: int = 1) -> LmEvalModel:
    """lm-eval's own transformers model on the same folder, float32 (what Loom serves on CPU)."""
    return LmEvalModel(
        name="hf", args=f"pretrained={model_dir},dtype=float32", device=device,
        batch_size=batch_size,
    )  # fmt: skip


def lm_eval_command(model: LmEvalModel, *, tasks: Sequence[str], output_dir: Path) -> list[str]:
    """The ``lm_eval run`` command line, with ``--log_samples`` (per-item answers)."""
    command = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", model.name, "--model_args", model.args,
        "--include_path", str(TASKS_DIR), "--tasks", *tasks,
        "--batch_size", str(model.batch_size),
        "--output_path", str(output_dir), "--log_samples",
    ]  # fmt: skip
    if model.device is not None:
        command += ["--device", model.device]
    return command


class LmEvalFailed(RuntimeError):
    """``lm_eval`` exited non-zero; the message ends with the tail of its output."""


@dataclass(frozen=True)
class LmEvalRun:
    """What one ``lm_eval`` run wrote: each task's metrics and its per-item samples."""

    results: dict[str, dict[str, Any]]
    """Task -> lm-eval's ``results`` entry (``{"acc,none": 0.5, "acc_stderr,none": ...}``)."""
    samples: dict[str, list[dict[str, Any]]]
    """Task -> its ``--log_samples`` rows, in ``doc_id`` order."""
    wall_s: float
    """The command's wall time, start to exit (its imports and model loading included)."""
    evaluation_s: float
    """From lm-eval building the model (loading the weights, or only the tokenizer for an
    endpoint) to its results file written: the scoring, less the imports and lm-eval's index of
    its ~10,000 built-in task files (~6 s a run here), which both sides pay alike."""
    log: Path

    def metric(self, task: str, name: str) -> float:
        """A task's metric under whatever filter it ran with (``acc``: ``acc,none``)."""
        found = [v for k, v in self.results[task].items() if k.split(",")[0] == name]
        if len(found) != 1:
            raise KeyError(f"{task} reports {sorted(self.results[task])}, not one {name!r}")
        return float(found[0])

    def loglikelihoods(self, task: str) -> list[list[float]]:
        """Per item, the loglikelihood of each choice (a multiple-choice task)."""
        return [[float(ll) for ll, _ in row["filtered_resps"]] for row in self.samples[task]]

    def greedy(self, task: str) -> list[list[bool]]:
        """Per item and choice: whether the choice is the greedy continuation."""
        return [[flag == "True" for _, flag in row["filtered_resps"]] for row in self.samples[task]]

    def generations(self, task: str) -> list[str]:
        """Per item, the generated text after the task's filters (a ``generate_until`` task)."""
        return [row["filtered_resps"][0] for row in self.samples[task]]


def read_output(output_dir: Path) -> tuple[Path, dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The newest ``results_*.json`` under ``output_dir`` (lm-eval adds a folder named after
    the model), its content, and the ``samples_<task>_*.jsonl`` written with it, by task."""
    results_files = sorted(output_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results_files:
        raise LmEvalFailed(f"lm_eval wrote no results under {output_dir}")
    results_file = results_files[-1]
    stamp = results_file.name.removeprefix("results_").removesuffix(".json")
    document = json.loads(results_file.read_text())
    samples = {}
    for task in document["results"]:
        path = results_file.parent / f"samples_{task}_{stamp}.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            samples[task] = sorted(rows, key=lambda row: row["doc_id"])
    return results_file, document, samples


def run_lm_eval(
    model: LmEvalModel,
    *,
    tasks: Sequence[str],
    output_dir: Path,
    env: Mapping[str, str],
    timeout_s: float = 600,
) -> LmEvalRun:
    """Run ``lm_eval`` to completion in the repository root, its output in
    ``output_dir/lm_eval.log``; raises ``LmEvalFailed`` if it exits non-zero."""
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "lm_eval.log"
    command = lm_eval_command(model, tasks=tasks, output_dir=output_dir)
    started = time.perf_counter()
    with log.open("wb") as out:
        code = subprocess.run(
            command, cwd=REPO_ROOT, env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
        ).returncode  # fmt: skip
    wall_s = time.perf_counter() - started
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise LmEvalFailed(f"lm_eval --model {model.name} exited with {code}:\n{tail}")
    results_file, document, samples = read_output(output_dir)
    # "date": the epoch time simple_evaluate started, before it built the model
    evaluation_s = results_file.stat().st_mtime - float(document["date"])
    return LmEvalRun(
        results=document["results"],
        samples=samples,
        wall_s=wall_s,
        evaluation_s=evaluation_s,
        log=log,
    )
