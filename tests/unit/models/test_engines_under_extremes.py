"""Property tests: each engine driven with extreme but schema-valid parameters and inputs, and
a normal request batched beside the extreme one gets the answer it gets alone.

- generation (tiny GPT-2): temperatures from 0 through subnormal and 1e-300 to 2 (and far past,
  as the engine takes any finite one), top_p down to the smallest positive float, seeds at the
  int64 bounds, prompts from one odd character to the whole context;
- tensor classifier (digits, MLP and CNN): rows of finite float32 values out to +-3.4e38;
- embedding (bundled MiniLM) and text classifier: empty, whitespace, odd Unicode and texts of
  up to ~100k characters.

Hypothesis runs a bounded number of derandomised examples with no deadline (so a slow machine
changes nothing) and keeps no example database in the tree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_folders import make_digits_folder, make_text_classifier_folder, make_tiny_gpt2_folder

from models.bundled import bundled_model_dir
from models.engines.classify import TensorClassifierEngine, TextClassifierEngine
from models.engines.embed import EmbeddingEngine
from models.engines.generate import (
    SEED_MAX,
    SEED_MIN,
    Generation,
    GenerationEngine,
    PromptError,
    SamplingParams,
    SequenceUpdate,
)

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FLOAT32_MAX = float(np.finfo(np.float32).max)

ODD_TEXT = st.one_of(
    st.text(min_size=0, max_size=64),  # any code point but lone surrogates (JSON refuses them)
    st.sampled_from(
        [
            "",
            " ",
            "\n\t\r ",
            "\u200b\u200d\u2060",  # zero-width space, joiner, word joiner
            "e\u0301" * 200,  # combining accents
            "\u202eevil\u202c",  # right-to-left override
            "👩‍👩‍👧‍👦" * 50,  # one emoji of seven code points, repeated
            "\x00\x01\x7f",
            "\ufeff\ufffd",
        ]
    ),
    # long: a few characters repeated to ~100k
    st.builds(lambda s, k: s * k, st.text(min_size=1, max_size=6), st.integers(2_000, 16_000)),
)


# ---- generation ---------------------------------------------------------------------------------

NORMAL = [
    ("the quick brown", SamplingParams(max_tokens=8, temperature=0)),
    ("once upon a time", SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7)),
]
TEMPERATURES = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-6, 1e-5, 1e-4, 1.0, 2.0, 1e30, 1e300]),
    st.floats(min_value=0.0, max_value=2.0),
)
TOP_PS = st.one_of(
    st.sampled_from([5e-324, 1e-300, 1e-9, 0.5, 1.0 - 1e-16, 1.0]),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
)
SEEDS = st.one_of(
    st.none(), st.sampled_from([SEED_MIN, -1, 0, SEED_MAX]), st.integers(SEED_MIN, SEED_MAX)
)


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerationEngine]:
    folder = make_tiny_gpt2_folder(tmp_path_factory.mktemp("gpt2-extremes"))
    engine = GenerationEngine(folder, device="cpu", max_sequences=8)
    engine.load()
    engine.warmup()
    yield engine
    engine.close()


def generate_together(
    engine: GenerationEngine, batch: Sequence[tuple[str | list[int], SamplingParams]]
) -> list[Generation | PromptError]:
    """Every (prompt, params) submitted back to back, so they share the running batch; a
    refused prompt gives its ``PromptError`` in its place."""
    results: list[Generation | PromptError | None] = [None] * len(batch)
    done = threading.Semaphore(0)
    waiting = 0

    def collector(i: int) -> Callable[[SequenceUpdate], None]:
        parts: list[str] = []

        def on_update(update: SequenceUpdate) -> None:
            parts.append(update.delta)
            if update.finished:
                reason = update.finish_reason or "error"
                results[i] = Generation("".join(parts), update.token_ids, 0, reason, update.error)
                done.release()

        return on_update

    for i, (prompt, params) in enumerate(batch):
        try:
            engine.submit(prompt, params, on_update=collector(i))
            waiting += 1
        except PromptError as refused:
            results[i] = refused
    for _ in range(waiting):
        done.acquire()
    return [r for r in results if r is not None]


@pytest.fixture(scope="module")
def normal_alone(generator: GenerationEngine) -> list[Generation | PromptError]:
    return [generate_together(generator, [request])[0] for request in NORMAL]


def prompt_at_full_length(engine: GenerationEngine, max_tokens: int, fill: int) -> list[int]:
    """Token ids that leave exactly ``max_tokens`` of the context."""
    vocab = engine.tokenizer.vocab_size
    length = engine.context_length - max_tokens
    return [(fill + 37 * i) % vocab for i in range(length)]


@PROPERTY
@given(
    temperature=TEMPERATURES,
    top_p=TOP_PS,
    seed=SEEDS,
    max_tokens=st.integers(1, 24),
    prompt=st.one_of(ODD_TEXT, st.integers(0, 10_000)),  # an int: a full-context prompt
    ignore_eos=st.booleans(),
)
def test_extreme_sampling_fails_nothing_and_changes_no_neighbour(
    generator: GenerationEngine,
    normal_alone: list[Generation],
    temperature: float,
    top_p: float,
    seed: int | None,
    max_tokens: int,
    prompt: str | int,
    ignore_eos: bool,
) -> None:
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        ignore_eos=ignore_eos,
    )
    ids = prompt_at_full_length(generator, max_tokens, prompt) if isinstance(prompt, int) else None
    extreme = (ids if ids is not None else prompt, params)
    results = generate_together(generator, [NORMAL[0], extreme, NORMAL[1]])
    assert [results[0], results[2]] == normal_alone
    odd = results[1]
    if isinstance(odd, PromptError):  # refused up front (the text tokenises to too much)
        assert isinstance(prompt, str)
    else:
        assert odd.error is None, odd.error
        assert odd.finish_reason in ("stop", "length")
        assert len(odd.token_ids) <= max_tokens
    generator.check()


# ---- the tensor classifier -------------------------------------------------------------------

FLOAT32S = st.one_of(
    st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, 1e-45, -1e-45, 0.0, -0.0, 16.0]),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
)
EXTREME_ROWS = st.one_of(
    st.lists(FLOAT32S, min_size=64, max_size=64),
    st.builds(lambda v: [v] * 64, FLOAT32S),
    st.builds(lambda v: [v, -v] * 32, FLOAT32S),
)
DIGIT_ROW = (np.arange(64, dtype=np.float32) * 7) % 17  # a digit-like row, 0..16


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def digits(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> TensorClassifierEngine:
    folder = make_digits_folder(
        tmp_path_factory.mktemp(f"digits-{request.param}"), arch=request.param
    )
    engine = TensorClassifierEngine(folder, device="cpu")
    engine.load()
    return engine


@PROPERTY
@given(row=EXTREME_ROWS)
def test_an_extreme_row_changes_no_other_row(
    digits: TensorClassifierEngine, row: list[float]
) -> None:
    alone = digits.run(DIGIT_ROW[None, :])
    batch = np.stack([DIGIT_ROW, np.asarray(row, dtype=np.float32), DIGIT_ROW])
    out = digits.run(batch)
    np.testing.assert_allclose(out[[0, 2]], np.repeat(alone, 2, axis=0), rtol=1e-5, atol=1e-6)
    assert np.isfinite(out[1]).all(), out[1]
    assert out[1].sum() == pytest.approx(1.0, abs=1e-5)


# ---- the text engines -------------------------------------------------------------------------

NORMAL_TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def embedder() -> EmbeddingEngine:
    engine = EmbeddingEngine(bundled_model_dir(), device="cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def text_classifier(tmp_path_factory: pytest.TempPathFactory) -> TextClassifierEngine:
    engine = TextClassifierEngine(
        make_text_classifier_folder(tmp_path_factory.mktemp("sentiment-extremes")), device="cpu"
    )
    engine.load()
    return engine


@PROPERTY
@given(text=ODD_TEXT)
def test_an_odd_text_changes_no_other_embedding(embedder: EmbeddingEngine, text: str) -> None:
    alone = embedder.run([NORMAL_TEXT]).vectors
    result = embedder.run([NORMAL_TEXT, text, NORMAL_TEXT])
    np.testing.assert_allclose(result.vectors[[0, 2]], np.repeat(alone, 2, axis=0), atol=1e-5)
    assert np.isfinite(result.vectors[1]).all()
    assert np.linalg.norm(result.vectors[1]) == pytest.approx(1.0, abs=1e-4)
    assert 2 <= result.token_counts[1] <= embedder.max_length


@PROPERTY
@given(text=ODD_TEXT)
def test_an_odd_text_changes_no_other_classification(
    text_classifier: TextClassifierEngine, text: str
) -> None:
    alone = text_classifier.run([NORMAL_TEXT])
    out = text_classifier.run([NORMAL_TEXT, text, NORMAL_TEXT])
    np.testing.assert_allclose(out[[0, 2]], np.repeat(alone, 2, axis=0), atol=1e-5)
    assert np.isfinite(out[1]).all()
    assert out[1].sum() == pytest.approx(1.0, abs=1e-5)
