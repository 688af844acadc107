"""The generation engine on a tiny random GPT-2 (2 layers) with a tokenizer trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.engines.generate import (
    GenerationEngine,
    SamplingParams,
    cut_at_stop,
    pick_next_token,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model serves requests and streams tokens back",
    "once upon a time there was a tiny language model",
] * 20


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    bpe.train_from_iterator(CORPUS, trainer)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> GenerationEngine:
    engine = GenerationEngine(tiny_gpt2, device="cpu")
    engine.load()
    engine.warmup()
    return engine


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


def test_streamed_deltas_join_to_the_whole_text(engine):
    params = SamplingParams(max_tokens=10, temperature=0)
    (whole,) = engine.run([("a model", params)])
    assert "".join(engine.stream("a model", params)) == whole.text


def test_max_tokens_ends_with_length_and_counts_tokens(engine):
    (result,) = engine.run([("the lazy", SamplingParams(max_tokens=3, temperature=0))])
    if result.finish_reason == "length":
        assert len(result.token_ids) == 3
    assert result.prompt_tokens == engine.count_tokens("the lazy")


def test_a_stop_string_ends_generation_before_it(engine):
    params = SamplingParams(max_tokens=20, temperature=0)
    (free,) = engine.run([("the quick", params)])
    if len(free.text) < 3:
        pytest.skip("the random model ended at once; nothing to stop on")
    stop = free.text[1:3]
    (stopped,) = engine.run(
        [("the quick", SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))]
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert (
        "".join(
            engine.stream("the quick", SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
        )
        == stopped.text
    )


def test_same_seed_samples_the_same_text(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first, second = engine.run([("once", params), ("once", params)])
    assert first.token_ids == second.token_ids


def test_prompt_plus_max_tokens_beyond_the_context_is_refused(engine):
    with pytest.raises(ValueError, match="context of 64 tokens"):
        engine.run([("the quick brown fox", SamplingParams(max_tokens=64, temperature=0))])


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0}, {"top_p": 1.5}, {"stop": ("",)}],
)
def test_bad_sampling_params_are_refused(kwargs):
    with pytest.raises(ValueError, match="max_tokens|temperature|top_p|stop"):
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
