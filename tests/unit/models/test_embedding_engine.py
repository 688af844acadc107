"""The embedding engine on the bundled MiniLM, against two references computed here.

The model loads once per module (about a second); every test shares it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from models.bundled import bundled_model_dir
from models.engines import EmbeddingEngine

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Loom serves embeddings through Ray Serve with dynamic batching and admission control.",
    "",
    "Ünïcödé, emoji 🚀 and punctuation!?",
]
LONG_TEXT = "serving " * 1000  # ~1000 word pieces, far past 256


@pytest.fixture(scope="module")
def engine() -> EmbeddingEngine:
    engine = EmbeddingEngine(bundled_model_dir(), device="cpu")
    engine.load()
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def reference_mean_pool() -> np.ndarray:
    """Mean over the attention mask, then L2 normalise: written out by hand, one text at a time."""
    path = str(bundled_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    rows = []
    with torch.no_grad():
        for text in TEXTS:
            encoded = tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
            hidden = model(**encoded).last_hidden_state[0]  # (T, H)
            mask = encoded["attention_mask"][0].unsqueeze(-1).float()  # (T, 1)
            mean = (hidden * mask).sum(0) / mask.sum()
            rows.append((mean / mean.norm()).numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def sentence_transformer() -> SentenceTransformer:
    return SentenceTransformer(str(bundled_model_dir()), device="cpu")


def test_vectors_match_a_hand_written_mean_pool(
    engine: EmbeddingEngine, reference_mean_pool: np.ndarray
) -> None:
    result = engine.run(TEXTS)

    assert result.vectors.shape == (5, 384)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(result.vectors, reference_mean_pool, atol=1e-5)


def test_vectors_match_sentence_transformers(
    engine: EmbeddingEngine, sentence_transformer: SentenceTransformer
) -> None:
    expected = sentence_transformer.encode([*TEXTS, LONG_TEXT], normalize_embeddings=True)

    result = engine.run([*TEXTS, LONG_TEXT])

    np.testing.assert_allclose(result.vectors, expected, atol=1e-5)


def test_vectors_have_unit_length(engine: EmbeddingEngine) -> None:
    norms = np.linalg.norm(engine.run(TEXTS).vectors, axis=1)

    np.testing.assert_allclose(norms, np.ones(len(TEXTS)), atol=1e-5)


def test_token_counts_include_special_tokens(engine: EmbeddingEngine) -> None:
    result = engine.run(["hello world", ""])

    # [CLS] hello world [SEP] = 4; an empty text is still [CLS] [SEP] = 2
    assert result.token_counts == (4, 2)
    assert engine.count_tokens(["hello world", ""]) == [4, 2]


def test_token_counts_agree_with_the_tokenizer_for_every_text(engine: EmbeddingEngine) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()), local_files_only=True)
    expected = [len(tokenizer(text)["input_ids"]) for text in TEXTS]

    assert list(engine.run(TEXTS).token_counts) == expected
    assert engine.count_tokens(TEXTS) == expected


def test_a_long_text_is_truncated_at_max_length(
    engine: EmbeddingEngine, sentence_transformer: SentenceTransformer
) -> None:
    assert engine.max_length == 256  # sentence_bert_config.json's max_seq_length, not 512

    result = engine.run([LONG_TEXT])

    assert result.token_counts == (256,)
    assert engine.count_tokens([LONG_TEXT]) == [256]
    # the same vector as the first 254 word pieces between [CLS] and [SEP]
    truncated = " ".join(["serving"] * 254)
    np.testing.assert_allclose(result.vectors, engine.run([truncated]).vectors, atol=1e-5)


def test_a_mixed_batch_equals_one_text_at_a_time(engine: EmbeddingEngine) -> None:
    batch = engine.run([*TEXTS, LONG_TEXT])
    singles = [engine.run([text]) for text in [*TEXTS, LONG_TEXT]]

    # padding to the longest (256) must not leak into the short texts' means
    np.testing.assert_allclose(
        batch.vectors, np.concatenate([s.vectors for s in singles]), atol=1e-5
    )
    assert batch.token_counts == tuple(s.token_counts[0] for s in singles)


def test_an_empty_batch_gives_an_empty_result(engine: EmbeddingEngine) -> None:
    result = engine.run([])

    assert result.vectors.shape == (0, 384)
    assert result.token_counts == ()


def test_a_smaller_max_length_truncates_sooner() -> None:
    engine = EmbeddingEngine(bundled_model_dir(), device="cpu", max_length=16)
    engine.load()

    assert engine.max_length == 16
    assert engine.run([LONG_TEXT]).token_counts == (16,)


def test_a_max_length_past_the_model_positions_is_refused() -> None:
    engine = EmbeddingEngine(bundled_model_dir(), device="cpu", max_length=1024)

    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        engine.load()


def test_using_the_engine_before_load_is_an_error() -> None:
    engine = EmbeddingEngine(bundled_model_dir(), device="cpu")

    with pytest.raises(RuntimeError, match=r"load\(\) must be called first"):
        engine.run(["x"])
