"""The model the generation benchmark serves: a ~10M-parameter GPT-2 with random weights and a
byte-level BPE tokenizer trained here on a synthetic corpus, plus the requests every variant
gets: prompts of 32-64 tokens, each asking for its own number of new tokens.

Random weights make nonsense text, but the work per token (the forward pass over a KV cache)
is what a trained model of that size does, which is all a throughput benchmark needs. Nothing
is downloaded.

    spec = TinyGptSpec()
    params = build_tiny_gpt(folder, spec)            # tokenizer + safetensors weights
    prompts = make_prompts(folder, count=64)         # [Prompt(text, tokens)], 32-64 tokens
    lengths = output_lengths(64, mean_tokens=64, seed=2)   # 32..96 new tokens, mean exactly 64
    requests = pair_requests([p.text for p in prompts], lengths)
    register_tiny_gpt(loom_home, folder, name="tinygpt")
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


@dataclass(frozen=True, kw_only=True)
class TinyGptSpec:
    """Shape of the benchmark's GPT-2; the defaults come to ~10.5M parameters."""

    n_layer: int = 6
    n_embd: int = 320
    """Width; 320 / 5 heads = 64 per head, as in GPT-2."""
    n_head: int = 5
    vocab_size: int = 8192
    """The tokenizer is trained to this size; the model's vocabulary is the tokenizer's."""
    n_positions: int = 512
    """Context length: longest prompt plus generated tokens."""
    seed: int = 0
    """Seeds the corpus, the tokenizer training data and the weights."""
    corpus_sentences: int = 20_000


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct made-up words of 2-4 syllables (``"bakoti"``), ASCII only, so every
    token decodes to whole characters and no streamed delta is a half-written UTF-8 byte."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words: set[str] = set()
    for _ in range(count * 20):
        if len(words) >= count:
            break
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.3:
            word += rng.choice(_CONSONANTS)
        words.add(word)
    return sorted(words)


def synthetic_sentences(seed: int, count: int, vocabulary: int = 6000) -> list[str]:
    """``count`` sentences of 8-24 pseudo-words drawn with a Zipf-like skew (word i weighs
    1/(i+1)), so BPE has frequent pairs to merge, as in real text."""
    rng = random.Random(seed)
    words = _pseudo_words(rng, vocabulary)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    return [
        " ".join(rng.choices(words, weights=weights, k=rng.randint(8, 24))) + "."
        for _ in range(count)
    ]


def build_tiny_gpt(folder: Path, spec: TinyGptSpec | None = None) -> int:
    """Train the tokenizer, build the random GPT-2 and save both to ``folder`` (safetensors).

    Returns the model's parameter count (tied input/output embeddings counted once).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    spec = spec or TinyGptSpec()
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, min_frequency=2, special_tokens=["<eos>", "<pad>"]
    )
    bpe.train_from_iterator(synthetic_sentences(spec.seed, spec.corpus_sentences), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=spec.n_positions,
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(spec.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=spec.n_positions, n_embd=spec.n_embd,
        n_layer=spec.n_layer, n_head=spec.n_head, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def prompt_lengths(count: int, min_tokens: int, max_tokens: int) -> list[int]:
    """Target prompt lengths spread over [min_tokens, max_tokens], stepping by 7 so that
    neighbours (which often share a batch) differ: 32, 39, 46, 53, 60, 34, ... for 32-64."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    span = max_tokens - min_tokens + 1
    return [min_tokens + (7 * i) % span for i in range(count)]


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int
    """Its length in the model's tokens."""


def make_prompts(
    folder: Path, *, count: int = 64, min_tokens: int = 32, max_tokens: int = 64, seed: int = 1
) -> list[Prompt]:
    """``count`` distinct prompts of about ``prompt_lengths`` tokens each (whole words, so a
    prompt may run a token or two over its target), the same for every run and variant."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    sentences = synthetic_sentences(seed, count * 8)
    words = " ".join(sentences).split(" ")
    prompts, cursor = [], 0
    for target in prompt_lengths(count, min_tokens, max_tokens):
        taken: list[str] = []
        length = 0
        while length < target:
            taken.append(words[cursor % len(words)])
            cursor += 1
            length = len(tokenizer(" ".join(taken))["input_ids"])
        prompts.append(Prompt(" ".join(taken), length))
    return prompts


def output_length_bounds(mean_tokens: int) -> tuple[int, int]:
    """The range output lengths are drawn from, centred on ``mean_tokens`` and about half of it
    either side: 64 -> (32, 96); 5 -> (3, 7); 1 -> (1, 1)."""
    if mean_tokens < 1:
        raise ValueError(f"mean_tokens must be >= 1, got {mean_tokens}")
    half_span = mean_tokens // 2
    return mean_tokens - half_span, mean_tokens + half_span


def output_lengths(count: int, *, mean_tokens: int, seed: int) -> list[int]:
    """``count`` new-token counts, each uniform over ``output_length_bounds(mean_tokens)``,
    the same for a seed.

    Drawn in antithetic pairs (x, 2 * mean - x), both uniform over the same range: the list's
    mean is exactly ``mean_tokens`` when ``count`` is even, and so is that of any run of
    consecutive requests that starts at an even index and has an even length (a static batch
    of 8 or 32, the first 40 sequential requests), so every variant makes the same tokens per
    request on average as a run with every request at ``mean_tokens``: 64, seed 2 ->
    [39, 89, 43, 85, ...].
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    low, high = output_length_bounds(mean_tokens)
    rng = random.Random(seed)
    lengths: list[int] = []
    while len(lengths) < count:
        drawn = rng.randint(low, high)
        lengths += [drawn, low + high - drawn]
    return lengths[:count]


@dataclass(frozen=True)
class GenerationRequest:
    """One request of the benchmark's fixed list, the same for every variant."""

    prompt: str
    max_tokens: int
    """New tokens it makes (EOS ignored: exactly this many)."""


def pair_requests(prompts: Sequence[str], lengths: Sequence[int]) -> list[GenerationRequest]:
    """Request i = prompt i with length i; the two lists come from separate seeds, so a
    prompt's length says nothing of its output's."""
    if len(prompts) != len(lengths):
        raise ValueError(f"{len(prompts)} prompts but {len(lengths)} lengths")
    return [GenerationRequest(p, n) for p, n in zip(prompts, lengths, strict=True)]


def register_tiny_gpt(loom_home: Path, folder: Path, *, name: str) -> Path:
    """Register ``folder`` as a ``generate`` model in the store under ``loom_home``; returns
    the stored version's folder (what the stack will load)."""
    from models.settings import LoomEnv
    from models.store import ModelStore

    store = ModelStore(LoomEnv(home=loom_home).models_dir)
    store.register(name, folder, task="generate", source="benchmarks.generation_model")
    return store.resolve(name).path
