"""lm-evaluation-harness against ``loom serve`` as its users run it: ``lm_eval --model
local-completions`` on the repository's tasks (``training/eval_tasks``), the same tasks with
lm-eval's in-process ``hf`` model on the same weights, and the two compared item by item.

The keyed session server's ``tinygpt`` (conftest: a 2-layer GPT-2, random weights from a fixed
seed) is scored through ``/v1/completions`` with token-id prompts, ``echo`` and ``logprobs``,
the key in ``OPENAI_API_KEY`` (lm-eval's Bearer token). Its accuracy is chance (0.5 here: short
choices score higher), which is all this needs: the loglikelihoods must agree, and so the
choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from loom_process import API_KEY, LoomProcess

from benchmarks.lm_eval_runs import (
    GEN_METRIC,
    GEN_TASK,
    MC_METRIC,
    MC_TASK,
    LmEvalRun,
    LoomEndpoint,
    hf_in_process,
    local_completions,
    offline_env,
    run_lm_eval,
)
from models.settings import LoomEnv
from models.store import ModelStore

LL_TOLERANCE = 1e-4
"""A choice's loglikelihood, Loom's vs hf's (a sum over the choice's 1-3 tokens)."""
MC_ITEMS, GEN_ITEMS = 32, 16
TASKS = (MC_TASK, GEN_TASK)


@pytest.fixture(scope="module")
def tinygpt_dir(keyed_server: LoomProcess) -> Path:
    """The folder the server loaded ``tinygpt`` from (its stored version): the tokenizer
    lm-eval uses for Loom, and the weights ``hf`` loads."""
    models_dir = LoomEnv.from_environ({"LOOM_HOME": str(keyed_server.home)}).models_dir
    return ModelStore(models_dir).resolve("tinygpt").path


@pytest.fixture(scope="module")
def loom_run(
    keyed_server: LoomProcess, tinygpt_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> LmEvalRun:
    """Both tasks through the server: two requests in flight, two prompts to a request (a
    list of token-id lists)."""
    work = tmp_path_factory.mktemp("lm-eval-loom")
    endpoint = LoomEndpoint(
        url=keyed_server.url, model="tinygpt", tokenizer_dir=tinygpt_dir, batch_size=2
    )
    env = offline_env(work / "hf", api_key=API_KEY)
    return run_lm_eval(local_completions(endpoint), tasks=TASKS, output_dir=work, env=env)


@pytest.fixture(scope="module")
def hf_run(tinygpt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LmEvalRun:
    work = tmp_path_factory.mktemp("lm-eval-hf")
    env = offline_env(work / "hf")
    return run_lm_eval(hf_in_process(tinygpt_dir), tasks=TASKS, output_dir=work, env=env)


def test_lm_eval_local_completions_scores_both_tasks_against_loom(loom_run: LmEvalRun) -> None:
    assert len(loom_run.samples[MC_TASK]) == MC_ITEMS
    assert len(loom_run.samples[GEN_TASK]) == GEN_ITEMS
    assert 0.0 <= loom_run.metric(MC_TASK, MC_METRIC) <= 1.0
    assert 0.0 <= loom_run.metric(GEN_TASK, GEN_METRIC) <= 1.0
    # every item generated something: 8 tokens at most, cut at a newline
    assert all(text for text in loom_run.generations(GEN_TASK))


def test_loom_and_hf_give_the_same_loglikelihoods_so_the_same_accuracy(
    loom_run: LmEvalRun, hf_run: LmEvalRun
) -> None:
    loom, hf = loom_run.loglikelihoods(MC_TASK), hf_run.loglikelihoods(MC_TASK)
    assert len(loom) == len(hf) == MC_ITEMS
    pairs = [pair for rows in zip(loom, hf, strict=True) for pair in zip(*rows, strict=True)]
    worst = max(abs(a - b) for a, b in pairs)
    assert worst < LL_TOLERANCE, f"a choice's loglikelihood differs by {worst:.2e}"
    # is_greedy: Loom's from top_logprobs (the token's logprob equals the top one's), hf's
    # from the argmax of its logits
    assert loom_run.greedy(MC_TASK) == hf_run.greedy(MC_TASK)
    # the choices then agree: this model's top two choices are >= 0.03 apart on every item
    # (hf, seed 0), far above the tolerance, so no tie can flip one
    picks = [[row.index(max(row)) for row in lls] for lls in (loom, hf)]
    assert picks[0] == picks[1]
    assert loom_run.metric(MC_TASK, MC_METRIC) == hf_run.metric(MC_TASK, MC_METRIC)


def test_loom_generates_what_hf_generates_greedily(loom_run: LmEvalRun, hf_run: LmEvalRun) -> None:
    """``generate_until`` at temperature 0: the served model's greedy text is transformers'."""
    assert loom_run.generations(GEN_TASK) == hf_run.generations(GEN_TASK)
    assert loom_run.metric(GEN_TASK, GEN_METRIC) == hf_run.metric(GEN_TASK, GEN_METRIC)
