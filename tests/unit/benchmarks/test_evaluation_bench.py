"""The lm-eval runs' pure parts: the command line a user would type, the results read back
(and the right samples with them), the benchmark's figures, and the repository's task data
(the e2e test runs lm-eval itself: ``tests/e2e/test_lm_eval_e2e.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from benchmarks.evaluation import LmEvalBenchConfig, serving_config, summarise
from benchmarks.lm_eval_runs import (
    GEN_TASK,
    MC_TASK,
    TASKS_DIR,
    LoomEndpoint,
    hf_in_process,
    lm_eval_command,
    local_completions,
    offline_env,
    read_output,
)
from serving.config import parse_config


def test_local_completions_tokenizes_locally_and_sends_token_ids() -> None:
    endpoint = LoomEndpoint(url="http://127.0.0.1:8000", model="my-lm", tokenizer_dir=Path("/m"))
    model = local_completions(endpoint)
    args = dict(pair.split("=", 1) for pair in model.args.split(","))
    assert model.name == "local-completions"
    assert args["base_url"] == "http://127.0.0.1:8000/v1/completions"
    assert args["tokenizer_backend"] == "huggingface"  # not "auto": that probes the server
    assert (args["tokenizer"], args["tokenized_requests"]) == ("/m", "True")
    command = lm_eval_command(model, tasks=(MC_TASK, GEN_TASK), output_dir=Path("/out"))
    assert command[command.index("--include_path") + 1] == str(TASKS_DIR)
    assert command[command.index("--tasks") + 1 : command.index("--tasks") + 3] == [
        MC_TASK,
        GEN_TASK,
    ]
    assert "--device" not in command  # an endpoint has none
    hf = lm_eval_command(hf_in_process(Path("/m")), tasks=(MC_TASK,), output_dir=Path("/out"))
    assert hf[hf.index("--model_args") + 1] == "pretrained=/m,dtype=float32"
    assert hf[hf.index("--device") + 1] == "cpu"


def test_the_environment_is_offline_and_carries_the_key_only_when_given(tmp_path: Path) -> None:
    env = offline_env(tmp_path, api_key="k-1", environ={"OPENAI_API_KEY": "leaked", "A": "1"})
    assert env["OPENAI_API_KEY"] == "k-1"
    assert env["A"] == "1"
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert env["HF_HOME"] == str(tmp_path)
    assert "OPENAI_API_KEY" not in offline_env(tmp_path, environ={"OPENAI_API_KEY": "leaked"})


def test_read_output_takes_the_newest_results_and_their_own_samples(tmp_path: Path) -> None:
    folder = tmp_path / "my-lm"
    folder.mkdir()
    for stamp, acc in (("2026-01-01T00-00-00.1", 0.25), ("2026-01-02T00-00-00.1", 0.5)):
        results = {"results": {MC_TASK: {"acc,none": acc}}, "date": 1000.0}
        (folder / f"results_{stamp}.json").write_text(json.dumps(results))
        rows = [
            {"doc_id": i, "filtered_resps": [["-1.5", "False"]], "stamp": stamp} for i in (1, 0)
        ]
        (folder / f"samples_{MC_TASK}_{stamp}.jsonl").write_text(
            "\n".join(json.dumps(row) for row in rows) + "\n"
        )
        os.utime(folder / f"results_{stamp}.json", (1000 + acc * 100, 1000 + acc * 100))
    results_file, document, samples = read_output(tmp_path)
    assert results_file.name == "results_2026-01-02T00-00-00.1.json"  # mtime 1050 > 1025
    assert document["results"][MC_TASK]["acc,none"] == 0.5
    assert [row["doc_id"] for row in samples[MC_TASK]] == [0, 1]
    assert {row["stamp"] for row in samples[MC_TASK]} == {"2026-01-02T00-00-00.1"}


def test_the_figures_are_medians_and_loom_over_hf() -> None:
    runs = {
        "loom": [{"wall_s": w, "evaluation_s": w - 10, "accuracy": 0.5} for w in (20, 30, 22)],
        "hf": [{"wall_s": w, "evaluation_s": w - 10, "accuracy": 0.5} for w in (40, 44, 50)],
    }
    figures = summarise(runs)
    assert (figures["loom_wall_s"], figures["hf_wall_s"]) == (22, 44)
    assert figures["loom_over_hf_wall_s"] == 0.5  # 22 / 44
    assert figures["loom_over_hf_evaluation_s"] == 12 / 34
    assert figures["accuracy_equal"] is True


def test_the_served_model_config_is_one_loom_accepts() -> None:
    config = LmEvalBenchConfig(
        model_dir=None, threads=2, num_concurrent=8, batch_size=1, max_sequences=16,
        repeats=1, out_path=None, ready_timeout_s=1.0, run_timeout_s=1.0,
    )  # fmt: skip
    (model,) = parse_config(serving_config(config)).models
    assert (model.task, model.num_cpus, model.generation.max_sequences) == ("generate", 2, 16)


def test_the_repository_tasks_read_local_jsonl_with_well_formed_items() -> None:
    """Each task's ``data_files`` is a JSONL in the repository (relative to its root, where
    lm-eval runs); a choice item has its label among its choices, and the right answer sits
    at each of the four positions equally often (always picking one scores 25%)."""
    repo = TASKS_DIR.parents[1]
    counts = {}
    for task in (MC_TASK, GEN_TASK):
        spec = yaml.safe_load((TASKS_DIR / task / f"{task}.yaml").read_text())
        assert spec["task"] == task
        assert spec["dataset_path"] == "json"
        data = repo / spec["dataset_kwargs"]["data_files"]["test"]
        items = [json.loads(line) for line in data.read_text().splitlines()]
        counts[task] = len(items)
        if task == MC_TASK:
            assert all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 for i in items)
            positions = [sum(i["label"] == k for i in items) for k in range(4)]
            assert positions == [8, 8, 8, 8]
        else:
            assert all(i["prompt"] and i["answer"] for i in items)
    assert counts == {MC_TASK: 32, GEN_TASK: 16}
