"""Logprobs from the generation engine: generated tokens' (``SamplingParams.logprobs``) and
prompt tokens' (``prompt_logprobs``, computed in the continuous batch's prefill), each equal
to ``log_softmax`` of transformers' own forward over the same tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from model_folders import make_tiny_gpt2_folder

from models.engines.generate import GenerationEngine, SamplingParams
from models.engines.sampling import GREEDY_SLOT

LONG_PROMPT = "the quick brown fox jumps over the lazy dog and a model serves requests back"
SHORT_PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2_folder(tmp_path_factory.mktemp("tiny-gpt2-logprobs"))


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> Iterator[GenerationEngine]:
    # 8 tokens a step: a long prompt is prefilled in several chunks, beside decoding rows
    engine = GenerationEngine(tiny_gpt2, device="cpu", max_sequences=4, max_batch_tokens=8)
    engine.load()
    engine.warmup()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(tiny_gpt2: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_gpt2, use_safetensors=True).eval()


def log_softmax(model: torch.nn.Module, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(positions, vocab): row p is the distribution of the token after ids[:p + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def test_echoed_prompt_logprobs_equal_log_softmax_of_the_forward(engine, reference):
    ids = engine.tokenizer(LONG_PROMPT)["input_ids"]
    assert len(ids) > 8  # more than one step's tokens: the prefill is chunked
    results = engine.run(
        [
            (SHORT_PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
            (LONG_PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=3)),
            (SHORT_PROMPT, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0)),
        ]
    )
    scored = results[1].prompt_logprobs
    assert scored is not None
    assert len(scored) == len(ids)
    assert scored[0] is None
    want = log_softmax(reference, ids)
    for position, entry in enumerate(scored[1:], start=1):
        assert entry is not None
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(want[position - 1, ids[position]].item(), abs=1e-4)
        top = torch.topk(want[position - 1], 3)
        assert list(entry.top_ids) == top.indices.tolist()
        assert entry.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
    short = results[2].prompt_logprobs
    assert short is not None
    assert all(e is not None and e.top_ids == () for e in short[1:])
    assert results[0].prompt_logprobs is None
    assert results[0].logprobs == ()


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(engine):
    (scored,) = engine.run([(SHORT_PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=1))])
    assert scored.text == ""
    assert scored.token_ids == ()
    assert scored.finish_reason == "length"
    assert scored.prompt_logprobs is not None


def test_greedy_logprobs_are_the_top_ones_and_equal_the_reference(engine, reference):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    (greedy,) = engine.run([(SHORT_PROMPT, params)])
    prompt = engine.tokenizer(SHORT_PROMPT)["input_ids"]
    want = log_softmax(reference, prompt + list(greedy.token_ids))
    assert [e.token_id for e in greedy.logprobs] == list(greedy.token_ids)
    for j, entry in enumerate(greedy.logprobs):
        row = want[len(prompt) - 1 + j]
        assert entry.logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert entry.top_ids[0] == entry.token_id  # temperature 0: the sampled one is the max
        assert entry.top_logprobs == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-4)


def test_a_sampled_tokens_logprob_is_of_the_distribution_after_temperature(engine, reference):
    params = SamplingParams(max_tokens=5, temperature=0.5, seed=3, ignore_eos=True, logprobs=1)
    (sampled,) = engine.run([(SHORT_PROMPT, params)])
    (plain,) = engine.run([(SHORT_PROMPT, SamplingParams(max_tokens=5, temperature=0.5, seed=3,
                                                          ignore_eos=True))])  # fmt: skip
    assert sampled.token_ids == plain.token_ids  # asking for logprobs changes no draw
    prompt = engine.tokenizer(SHORT_PROMPT)["input_ids"]
    want = log_softmax(reference, prompt + list(sampled.token_ids), temperature=0.5)
    for j, (token, entry) in enumerate(zip(sampled.token_ids, sampled.logprobs, strict=True)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(want[len(prompt) - 1 + j, token].item(), abs=1e-4)


def test_logprobs_split_over_streamed_updates_cover_every_token_once(engine):
    updates = []
    finished = threading.Event()

    def collect(update):
        updates.append(update)
        if update.finished:
            finished.set()

    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    engine.submit(SHORT_PROMPT, params, on_update=collect)
    finished.wait()
    assert [e.token_id for u in updates for e in u.logprobs] == list(updates[-1].token_ids)


def test_a_batch_that_asks_for_nothing_gives_the_sampler_nothing_to_do(engine):
    slot = engine._sampler.add(SamplingParams(temperature=0))
    assert slot == GREEDY_SLOT  # the processor returns at once for such rows
    wanting = engine._sampler.add(SamplingParams(temperature=0, logprobs=0))
    assert wanting != GREEDY_SLOT
    engine._sampler.remove(wanting)


def test_the_end_of_sequence_token_that_ends_a_choice_has_its_logprob(engine):
    """As vLLM answers, and as lm-evaluation-harness reads an echoed ``max_tokens: 1``
    answer (prompt entries, then exactly one generated): the EOS is shown in the logprobs
    though not counted in the text or the completion tokens. The tokenizer's EOS is set,
    for this test, to the token greedy decoding picks first."""
    (first,) = engine.run([(SHORT_PROMPT, SamplingParams(max_tokens=1, temperature=0))])
    tokenizer = engine.tokenizer
    eos = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first.token_ids[0])
    try:
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
        (ended,) = engine.run([(SHORT_PROMPT, params)])
    finally:
        tokenizer.eos_token = eos
    assert ended.finish_reason == "stop"
    assert ended.token_ids == ()
    assert [e.token_id for e in ended.logprobs] == list(first.token_ids)


def test_a_prompt_scoring_failure_fails_its_sequence_alone(engine, monkeypatch):
    """The hook never raises into transformers' loop: a failure (here forced) ends the scored
    sequences of that batch with an error, and the sequence beside them finishes as usual."""

    def fail(*args, **kwargs):
        raise RuntimeError("the batch's tokens are not the planned prompt chunk")

    monkeypatch.setattr(engine, "_score", fail)
    scored, plain = engine.run(
        [
            (LONG_PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=1)),
            (SHORT_PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        ]
    )
    assert scored.finish_reason == "error"
    assert "prompt logprobs failed" in (scored.error or "")
    assert plain.error is None
    assert len(plain.token_ids) == 3
    engine.check()  # the loop goes on
