"""The generation engine on a tiny random GPT-2 (2 layers) with a tokenizer trained here."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from model_folders import make_tiny_gpt2_folder

from models.engines.generate import (
    GenerationEngine,
    PromptError,
    SamplingParams,
    SequenceUpdate,
    cut_at_stop,
    pick_next_token,
)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2_folder(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(tiny_gpt2, device="cpu", max_sequences=4)
    engine.load()
    engine.warmup()
    yield engine
    engine.close()


class Collector:
    """Gathers one sequence's updates, as a server's callback would."""

    def __init__(self) -> None:
        self.updates: list[SequenceUpdate] = []
        self.done = threading.Event()
        self.finished_at = 0.0

    def __call__(self, update: SequenceUpdate) -> None:
        self.updates.append(update)
        if update.finished:
            self.finished_at = time.monotonic()
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(u.delta for u in self.updates)


def test_greedy_output_equals_transformers_generate_token_for_token(engine, tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    for prompt in ["the quick brown", "once upon a time"]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        reference = model.generate(
            ids, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.eos_token_id
        )[0, ids.shape[1] :].tolist()
        (ours,) = engine.run([(prompt, SamplingParams(max_tokens=12, temperature=0))])
        # generate() ends with EOS when it stops early; ours stops before it
        eos = tokenizer.eos_token_id
        expected = reference[: reference.index(eos)] if eos in reference else reference
        assert list(ours.token_ids) == expected


def test_a_prompt_prefilled_in_chunks_still_equals_generate(tiny_gpt2):
    """A step holds at most 16 tokens here, so a 40-token prompt is prefilled over three steps
    (its later chunks attend to the cached earlier ones)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.engines.varlen_attention import VARLEN_ATTENTION

    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    small = GenerationEngine(tiny_gpt2, device="cpu", max_sequences=2, max_batch_tokens=16)
    small.load()
    try:
        assert small._loaded.model.config._attn_implementation == VARLEN_ATTENTION
        (ours,) = small.run(
            [(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]
        )
    finally:
        small.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, use_safetensors=True)
    ids = AutoTokenizer.from_pretrained(tiny_gpt2)(prompt, return_tensors="pt")["input_ids"]
    assert 32 < ids.shape[1] <= 56  # longer than two steps' budget, room for 8 more
    reference = model.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert list(ours.token_ids) == reference[0, ids.shape[1] :].tolist()


def test_streamed_deltas_join_to_the_whole_text(engine):
    params = SamplingParams(max_tokens=10, temperature=0)
    (whole,) = engine.run([("a model", params)])
    assert "".join(engine.stream("a model", params)) == whole.text


def test_max_tokens_ends_with_length_and_counts_tokens(engine):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    (result,) = engine.run([("the lazy", params)])
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 3
    assert result.prompt_tokens == engine.count_tokens("the lazy")


def test_a_stop_string_ends_generation_before_it(engine):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    (free,) = engine.run([("the quick", params)])
    assert len(free.text) >= 3, free  # 20 tokens of a 300-token BPE vocabulary
    stop = free.text[1:3]
    (stopped,) = engine.run(
        [("the quick", SamplingParams(max_tokens=20, temperature=0, stop=(stop,), ignore_eos=True))]
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert (
        "".join(
            engine.stream(
                "the quick",
                SamplingParams(max_tokens=20, temperature=0, stop=(stop,), ignore_eos=True),
            )
        )
        == stopped.text
    )


def test_same_seed_samples_the_same_text(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first, second = engine.run([("once", params), ("once", params)])
    assert first.token_ids == second.token_ids


def test_a_seeded_sample_in_a_mixed_batch_equals_sampling_it_alone(engine, tiny_gpt2):
    """Each row samples with its own sequence's generator: the same draws as a plain loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    other = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    _, ours, _ = engine.run([("the lazy", greedy), ("once upon", params), ("a model", other)])

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, use_safetensors=True).eval()
    ids = AutoTokenizer.from_pretrained(tiny_gpt2)("once upon", return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(11)
    expected = []
    with torch.inference_mode():
        for _ in range(10):
            logits = model(input_ids=ids).logits[0, -1]
            token = pick_next_token(logits, params, generator)
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert list(ours.token_ids) == expected


def test_a_request_joining_a_running_batch_finishes_before_the_long_one(engine):
    long, short = Collector(), Collector()
    engine.submit("the quick", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                  on_update=long)  # fmt: skip
    while not long.updates:  # the long one is decoding
        time.sleep(0.001)
    engine.submit("once", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                  on_update=short)  # fmt: skip
    assert short.done.wait(30)
    assert long.done.wait(30)
    assert short.finished_at < long.finished_at
    assert short.updates[-1].completion_tokens == 3
    assert long.updates[-1].completion_tokens == 40


def test_cancelling_a_sequence_frees_its_slot(engine):
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    running = [Collector() for _ in range(engine.max_sequences)]
    ids = [engine.submit("the quick", params, on_update=c) for c in running]
    while engine.stats().running < engine.max_sequences:  # every slot taken
        time.sleep(0.001)
    waiting = Collector()
    engine.submit("once", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                  on_update=waiting)  # fmt: skip
    engine.cancel(ids[0])  # frees a slot: the waiting one gets it
    assert waiting.done.wait(30)
    assert not running[0].done.is_set()  # the cancelled one hears nothing more
    for seq_id in ids[1:]:
        engine.cancel(seq_id)
    deadline = time.monotonic() + 10
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.kv_cache_use == 0.0  # nothing running holds a page of the cache


def test_more_sequences_than_slots_all_finish_with_their_own_lengths(engine):
    batch = [("a model", SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
             for n in range(1, 11)]  # fmt: skip
    results = engine.run(batch)  # 10 sequences through 4 slots
    assert [len(r.token_ids) for r in results] == list(range(1, 11))


def test_prompt_plus_max_tokens_beyond_the_context_is_refused(engine):
    with pytest.raises(PromptError, match="context of 64 tokens"):
        engine.run([("the quick brown fox", SamplingParams(max_tokens=64, temperature=0))])


def test_an_empty_prompt_is_refused(engine):
    with pytest.raises(PromptError, match="empty"):
        engine.run([("", SamplingParams(max_tokens=4))])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": -1},
        {"temperature": -0.1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"stop": ("",)},
        {"logprobs": 21},
        {"prompt_logprobs": -1},
    ],
)
def test_bad_sampling_params_are_refused(kwargs):
    with pytest.raises(ValueError, match="max_tokens|temperature|top_p|stop|logprobs"):
        SamplingParams(**kwargs)


def test_top_p_keeps_only_the_nucleus():
    # probabilities [0.5, 0.3, 0.2]: top_p 0.7 keeps the first two; the third never comes up
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.7)
    picks = {pick_next_token(logits, params, generator) for _ in range(300)}
    assert picks == {0, 1}
    assert pick_next_token(logits, SamplingParams(temperature=0), None) == 0


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc. def!", [".", "!"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
