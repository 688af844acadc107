"""The ``lm`` trainer's building blocks on a real, small corpus: ~100 KB of the standard library.

One module-scoped pipeline (split -> tokeniser -> shard tokens -> merge -> 30 steps of
``tiny``) feeds the tests that need trained state, so the file stays well under a minute.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from training.program import ProgramSpec
from training.trainers.lm import (
    EOS_TOKEN_ID,
    CorpusPlan,
    LmTrainProgram,
    build_lm,
    corpus_files,
    export_lm,
    lm_preset,
    merge_token_files,
    plan_split,
    read_documents,
    tokenise_files,
    tokenizer_vocab_size,
    train_single_process,
    train_tokenizer,
)
from training.trainers.registry import TRAINERS

STDLIB_BUDGET_BYTES = 200_000
VOCAB = 512
STEPS = 30


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lm")


@pytest.fixture(scope="module")
def corpus() -> list[Path]:
    return corpus_files("stdlib", max_bytes=STDLIB_BUDGET_BYTES)


@pytest.fixture(scope="module")
def plan(corpus: list[Path]) -> CorpusPlan:
    return plan_split(corpus, shards=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer_dir(work: Path, corpus: list[Path]) -> Path:
    train_tokenizer(corpus, vocab_size=VOCAB, out_dir=work / "tokenizer")
    return work / "tokenizer"


@pytest.fixture(scope="module")
def token_files(work: Path, plan: CorpusPlan, tokenizer_dir: Path) -> dict[str, object]:
    shard_counts = [
        tokenise_files(
            [Path(f) for f in shard], tokenizer_dir=tokenizer_dir, out_path=work / f"{k}.npy"
        )
        for k, shard in enumerate(plan.train_shards)
    ]
    shard_paths = [work / f"{k}.npy" for k in range(len(plan.train_shards))]
    merged = merge_token_files(shard_paths, work / "train.npy")
    tokenise_files(
        [Path(f) for f in plan.val_files], tokenizer_dir=tokenizer_dir, out_path=work / "val.npy"
    )
    return {"shards": shard_paths, "shard_counts": shard_counts, "merged": merged}


def lm_params(work: Path, **overrides: object) -> dict[str, object]:
    params = {
        "train_tokens": str(work / "train.npy"),
        "val_tokens": str(work / "val.npy"),
        "preset": "tiny",
        "vocab_size": VOCAB,
        "seq_len": 32,
        "batch_size": 8,
        "max_steps": STEPS,
        "learning_rate": 3e-3,
        "seed": 0,
    }
    return {**params, **overrides}


@pytest.fixture(scope="module")
def program(work: Path, token_files: dict[str, object]) -> LmTrainProgram:
    return LmTrainProgram.from_params(lm_params(work))


@pytest.fixture(scope="module")
def trained(program: LmTrainProgram) -> tuple[torch.nn.Module, list[float]]:
    losses: list[float] = []
    model = train_single_process(program, on_step=lambda step, loss: losses.append(loss))
    return model, losses


# --- corpus and split ------------------------------------------------------------------------


def test_the_stdlib_corpus_is_sorted_within_budget_and_skips_tests_and_site_packages(corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [path.relative_to(root) for path in corpus]
    assert relative == sorted(relative)
    assert all(path.suffix == ".py" for path in corpus)
    assert not any({"site-packages", "test", "tests", "idlelib"} & set(r.parts) for r in relative)
    # whole files, in order, stopping before the first that would pass the budget
    assert sum(path.stat().st_size for path in corpus) <= STDLIB_BUDGET_BYTES
    assert corpus == corpus_files("stdlib", max_bytes=STDLIB_BUDGET_BYTES)


def test_a_folder_corpus_takes_txt_and_jsonl_recursively_and_refuses_an_empty_one(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/two.txt", "a.jsonl", "skip.md", "b/one.txt"):
        (tmp_path / name).write_text("x" * 10)
    files = corpus_files(str(tmp_path), max_bytes=25)  # 10 + 10 fit; the third would be 30
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.jsonl", "b/one.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        corpus_files(str(tmp_path / "empty"), max_bytes=1000)
    with pytest.raises(ValueError, match="more than the corpus budget"):
        corpus_files(str(tmp_path), max_bytes=5)


def test_the_plan_is_seeded_and_places_every_file_exactly_once():
    files = [f"/data/{i:02d}.txt" for i in range(20)]
    plan = plan_split(files, shards=8, seed=3)
    placed = plan.val_files + [f for shard in plan.train_shards for f in shard]
    assert sorted(placed) == files
    # 20 files x 5 % = 1 validation file; 19 dealt round-robin over 8 shards: 3,3,3,2,2,2,2,2
    assert len(plan.val_files) == 1
    assert [len(shard) for shard in plan.train_shards] == [3, 3, 3, 2, 2, 2, 2, 2]
    assert plan_split(list(reversed(files)), shards=8, seed=3) == plan  # input order is moot
    assert plan_split(files, shards=8, seed=4) != plan
    assert CorpusPlan.from_json(plan.to_json()) == plan


def test_few_files_give_no_empty_shard_and_one_file_gets_no_validation():
    plan = plan_split(["/d/a.txt", "/d/b.txt", "/d/c.txt"], shards=8, seed=0)
    assert len(plan.val_files) == 1
    assert [len(shard) for shard in plan.train_shards] == [1, 1]
    single = plan_split(["/d/a.txt"], shards=4, seed=0)
    assert single == CorpusPlan(train_shards=[["/d/a.txt"]], val_files=[])


# --- documents, tokeniser, token files -------------------------------------------------------


def test_jsonl_documents_are_the_text_fields_with_blank_lines_skipped(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert list(read_documents(path)) == ["first", "second"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [("not json", "not JSON"), ('{"title": "x"}', "no string"), ('{"text": 3}', "no string")],
)
def test_a_bad_jsonl_line_raises_naming_the_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(f'{{"text": "fine"}}\n{bad_line}\n')
    with pytest.raises(ValueError, match=rf"docs\.jsonl, line 2: {message}"):
        list(read_documents(path))


def test_the_tokenizer_round_trips_text_and_is_the_same_when_trained_again(
    tokenizer_dir, corpus, tmp_path
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == EOS_TOKEN_ID
    assert len(tokenizer) == tokenizer_vocab_size(tokenizer_dir) == VOCAB
    # byte-level: code, indentation and text outside the corpus's alphabet all come back
    for text in ["def f(x):\n    return x  # ok\n", "naïve café — 東京 🙂"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    train_tokenizer(corpus, vocab_size=VOCAB, out_dir=tmp_path / "again")
    first = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    again = json.loads((tmp_path / "again" / "tokenizer.json").read_text())["model"]
    assert (first["vocab"], first["merges"]) == (again["vocab"], again["merges"])


def test_shard_token_counts_add_up_to_the_merged_file_in_shard_order(plan, token_files, work):
    merged = np.load(work / "train.npy")
    shards = [np.load(path) for path in token_files["shards"]]
    assert merged.dtype == np.uint16  # 512 ids fit in 2 bytes
    assert token_files["merged"] == sum(token_files["shard_counts"]) == merged.size
    np.testing.assert_array_equal(merged, np.concatenate(shards))
    # every document (one per .py file) ends with <|endoftext|>, and nothing else is id 0
    assert [int((s == EOS_TOKEN_ID).sum()) for s in shards] == [len(p) for p in plan.train_shards]
    assert all(s[-1] == EOS_TOKEN_ID for s in shards)


# --- the program -----------------------------------------------------------------------------


def test_two_ranks_slices_concatenate_to_the_one_rank_batch(program):
    whole = program.batch(5, rank=0, world_size=1)
    halves = [program.batch(5, rank=r, world_size=2) for r in (0, 1)]
    assert whole.shape == (8, 33)  # batch_size x (seq_len + 1)
    assert whole.dtype == torch.int64
    assert torch.equal(torch.cat(halves), whole)
    assert torch.equal(program.batch(5, rank=0, world_size=1), whole)  # step alone decides
    assert not torch.equal(program.batch(6, rank=0, world_size=1), whole)
    with pytest.raises(ValueError, match="does not split evenly"):
        program.batch(5, rank=0, world_size=3)


def test_the_mean_of_two_ranks_gradients_is_the_one_rank_gradient(program):
    """What the all-reduce relies on: equal slices, each loss a mean over its slice."""
    model = program.build_model()

    def gradient(rank: int, world_size: int) -> torch.Tensor:
        model.zero_grad()
        program.loss(model, program.batch(2, rank=rank, world_size=world_size)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = gradient(0, 1)
    averaged = (gradient(0, 2) + gradient(1, 2)) / 2
    torch.testing.assert_close(averaged, whole, rtol=0, atol=1e-5)


def test_the_learning_rate_warms_up_then_decays_to_a_tenth(work, token_files):
    program = LmTrainProgram.from_params(
        lm_params(work, max_steps=200, learning_rate=3e-4, eval_batches=2)
    )
    assert program.warmup_steps == 20  # min(100, 200 // 10)
    assert program.learning_rate(0) == pytest.approx(3e-4 / 20)
    assert program.learning_rate(19) == pytest.approx(3e-4)
    assert program.learning_rate(199) == pytest.approx(3e-5)
    rates = [program.learning_rate(step) for step in range(19, 200)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert program.tokens_per_step == 8 * 32
    assert program.global_batch_size == 8


def test_the_optimizer_decays_matrices_and_not_biases_or_norms(program):
    model = program.build_model()
    decay, no_decay = program.build_optimizer(model).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.9, 0.95)
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n_params = len(list(model.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_build_lm_is_seeded_dropout_free_and_sized_for_seq_len():
    preset = lm_preset("tiny")
    a = build_lm(preset, vocab_size=VOCAB, seq_len=32, seed=1)
    b = build_lm(preset, vocab_size=VOCAB, seq_len=32, seed=1)
    c = build_lm(preset, vocab_size=VOCAB, seq_len=32, seed=2)
    weight = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    config = a.config
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert config.n_positions == 256  # max(seq_len 32, tiny's 256)
    assert build_lm(preset, vocab_size=VOCAB, seq_len=600, seed=1).config.n_positions == 600
    with pytest.raises(ValueError, match="unknown lm preset"):
        lm_preset("huge")


def test_tiny_learns_the_stdlib_sample_in_30_steps(trained):
    _, losses = trained
    # uniform over 512 ids is ln 512 = 6.24; seen here: 6.25 at step 0, ~5.49 over the last 5
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.15)
    assert np.mean(losses[-5:]) < losses[0] - 0.5


def test_evaluate_reports_perplexity_as_exp_of_val_loss_and_restores_train_mode(program, trained):
    model, _ = trained
    untrained = program.build_model()
    model.train()
    metrics = program.evaluate(model)
    assert model.training
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert program.evaluate(model) == metrics  # the same windows every call
    assert metrics["val_loss"] < program.evaluate(untrained)["val_loss"]


def test_build_program_finds_the_lm_program_by_name(work, token_files):
    built = TRAINERS.build_program(ProgramSpec(kind="lm", params=lm_params(work)))
    assert isinstance(built, LmTrainProgram)


# --- export ----------------------------------------------------------------------------------


def test_the_exported_folder_generates_and_scores_in_the_engine_as_transformers_does(
    trained, tokenizer_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    from models.engines.generate import GenerationEngine, SamplingParams

    model, _ = trained
    folder = export_lm(model, tokenizer_dir=tokenizer_dir, out_dir=tmp_path / "export")
    assert (folder / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".export.*"))  # the temporary folder was renamed away

    prompt, new_tokens = "import os\n\ndef ", 6
    engine = GenerationEngine(folder, device="cpu", max_sequences=2)
    engine.load()
    scored = "def add(a, b):\n    return a + b\n"
    try:
        generation, scoring = engine.run(
            [
                (
                    prompt,
                    SamplingParams(
                        max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=2
                    ),
                ),
                (scored, SamplingParams(max_tokens=0, prompt_logprobs=1)),
            ]
        )
        ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
        scored_ids = engine.tokenizer(scored)["input_ids"]
        assert engine.context_length == 256
    finally:
        engine.close()
    assert len(generation.token_ids) == new_tokens
    # the reference: greedy argmax, token by token, from the folder reloaded by transformers
    reloaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = reloaded(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        reference = torch.log_softmax(reloaded(input_ids=ids).logits[0].float(), dim=-1)
        prompt_reference = torch.log_softmax(
            reloaded(input_ids=torch.tensor([scored_ids])).logits[0].float(), dim=-1
        )
    assert list(generation.token_ids) == ids[0, -new_tokens:].tolist()
    # the served logprobs of the trained model: the reference's log-softmax, within 1e-4
    start = ids.shape[1] - new_tokens - 1
    for j, entry in enumerate(generation.logprobs):
        assert entry.logprob == pytest.approx(reference[start + j].max().item(), abs=1e-4)
        assert entry.top_logprobs[0] == pytest.approx(entry.logprob, abs=1e-6)
    assert scoring.prompt_logprobs is not None
    assert scoring.prompt_logprobs[0] is None
    assert len(scoring.prompt_logprobs) == len(scored_ids)
    for position, entry in enumerate(scoring.prompt_logprobs[1:], start=1):
        assert entry is not None
        assert entry.token_id == scored_ids[position]
        want = prompt_reference[position - 1, scored_ids[position]].item()
        assert entry.logprob == pytest.approx(want, abs=1e-4)
