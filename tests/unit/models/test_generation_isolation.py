"""Isolation inside a continuous batch, on a tiny GPT-2: a sequence whose sampling, decoding or
callback fails ends alone with an error and the others in the batch go on unchanged; should
transformers' loop die anyway, every held sequence hears of it at once, the engine refuses new
ones and says so to its health check and listeners. Parameters at the edges of their ranges
are clamped where the math needs it (a temperature of 1e-300 is greedy)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from model_folders import make_tiny_gpt2_folder

from models.engines import sampling
from models.engines.generate import (
    MIN_SAMPLING_TEMPERATURE,
    SEED_MAX,
    SEED_MIN,
    EngineStopped,
    Generation,
    GenerationEngine,
    PromptError,
    SamplingParams,
    SequenceUpdate,
    pick_next_token,
    sample_seed,
)
from models.engines.sampling import SamplingError, SequenceSampler

PROMPT = "once upon a time"
POISONED_SEED = 4242
"""Tests make sampling raise for the sequence with this seed."""


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2_folder(tmp_path_factory.mktemp("tiny-gpt2-isolation"))


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(tiny_gpt2, device="cpu", max_sequences=4)
    engine.load()
    engine.warmup()
    yield engine
    engine.close()


@pytest.fixture
def poisoned_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling raises for the sequence seeded ``POISONED_SEED`` (as NaN logits would)."""
    real = sampling.pick_next_token

    def pick(logits: torch.Tensor, params: SamplingParams, generator: object) -> int:
        if params.seed == POISONED_SEED:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, generator)  # type: ignore[arg-type]

    monkeypatch.setattr(sampling, "pick_next_token", pick)


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def seeded(seed: int, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=seed)


def answer(engine: GenerationEngine, params: SamplingParams) -> Generation:
    (alone,) = engine.run([(PROMPT, params)])
    return alone


# ---- parameters at their edges --------------------------------------------------------------


def test_a_temperature_below_the_floor_is_greedy(engine: GenerationEngine) -> None:
    reference = answer(engine, greedy())
    for temperature in (1e-300, 5e-324, MIN_SAMPLING_TEMPERATURE / 2):
        params = SamplingParams(max_tokens=8, temperature=temperature, seed=1)
        assert params.greedy
        assert answer(engine, params) == reference
    engine.check()  # the loop lives on


def test_pick_next_token_stays_finite_at_any_temperature() -> None:
    logits = torch.tensor([3e38, -3e38, 0.0, 1e30])
    generator = torch.Generator().manual_seed(0)
    for temperature in (MIN_SAMPLING_TEMPERATURE, 1e-3, 1.0, 2.0, 1e30, 1e300):
        for top_p in (5e-324, 0.5, 1.0):
            token = pick_next_token(
                logits, SamplingParams(temperature=temperature, top_p=top_p), generator
            )
            assert 0 <= token < 4
    with pytest.raises(SamplingError):
        pick_next_token(torch.tensor([float("nan"), 1.0]), SamplingParams(), generator)


def test_seeds_are_int64_and_a_choices_seed_wraps_within_them(engine: GenerationEngine) -> None:
    assert sample_seed(SEED_MAX, 1) == SEED_MIN
    assert sample_seed(SEED_MIN, 0) == SEED_MIN
    assert sample_seed(7, 2) == 9
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        first, again = answer(engine, seeded(seed)), answer(engine, seeded(seed))
        assert first == again
        assert first.error is None
    for seed in (SEED_MAX + 1, SEED_MIN - 1, 2**70):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", -1e-9),
        ("top_p", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.0000001),
        ("max_tokens", -1),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
    ],
)
def test_sampling_params_outside_their_range_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_prompt_ids_outside_the_vocabulary_never_reach_the_batch(
    engine: GenerationEngine,
) -> None:
    vocab = engine.tokenizer.vocab_size + len(engine.tokenizer.get_added_vocab())
    for ids in ([], [-1], [vocab + 10**6], [1, 2**40]):
        with pytest.raises(PromptError):
            engine.submit(ids, greedy(), on_update=lambda update: None)
    engine.check()


# ---- one sequence fails, the batch goes on ----------------------------------------------------


@pytest.mark.usefixtures("poisoned_sampling")
def test_a_sequence_whose_sampling_fails_fails_alone(engine: GenerationEngine) -> None:
    alone = [answer(engine, greedy()), answer(engine, seeded(3))]
    batch = engine.run([(PROMPT, greedy()), (PROMPT, seeded(POISONED_SEED)), (PROMPT, seeded(3))])
    assert batch[1].finish_reason == "error"
    assert batch[1].error is not None
    assert "sampling failed" in batch[1].error
    assert [batch[0], batch[2]] == alone  # its neighbours: as if it had never been there
    engine.check()
    assert answer(engine, greedy()) == alone[0]  # and the engine serves on


def test_a_sequence_whose_decoding_fails_fails_alone(engine: GenerationEngine) -> None:
    alone = answer(engine, greedy())

    class BrokenText:
        stopped = False

        def push(self, token_ids: list[int], *, final: bool = False) -> str:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    updates: dict[str, list[SequenceUpdate]] = {"broken": [], "fine": []}
    done = threading.Semaphore(0)

    def collect(name: str) -> Callable[[SequenceUpdate], None]:
        def on_update(update: SequenceUpdate) -> None:
            updates[name].append(update)
            if update.finished:
                done.release()

        return on_update

    # the broken sequence is submitted first and handed its broken text before it runs a step
    broken = engine.submit(PROMPT, greedy(), on_update=collect("broken"))
    engine._sequences[broken].text = BrokenText()  # type: ignore[assignment]
    engine.submit(PROMPT, greedy(), on_update=collect("fine"))
    done.acquire()
    done.acquire()
    assert [u.error for u in updates["broken"]] == [
        "generation failed: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    ]
    assert not updates["broken"][-1].batch_failed
    assert "".join(u.delta for u in updates["fine"]) == alone.text
    assert updates["fine"][-1].finish_reason == alone.finish_reason
    engine.check()


def test_a_callback_that_raises_loses_only_its_own_sequence(engine: GenerationEngine) -> None:
    alone = answer(engine, greedy(max_tokens=12))

    def explode(update: SequenceUpdate) -> None:
        raise RuntimeError("the caller's loop is gone")

    engine.submit(PROMPT, greedy(max_tokens=12), on_update=explode)
    assert answer(engine, greedy(max_tokens=12)) == alone
    engine.check()


# ---- the loop dies anyway ---------------------------------------------------------------------


def test_a_dead_loop_fails_every_held_sequence_at_once_and_refuses_new_ones(
    tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = GenerationEngine(tiny_gpt2, device="cpu", max_sequences=4)
    engine.load()
    engine.warmup()
    heard: list[str] = []
    told = threading.Event()
    engine.on_stopped(lambda reason: (heard.append(reason), told.set()))
    step_entered, release_step = threading.Event(), threading.Event()

    def fail_the_step(self: SequenceSampler, requests: list[object]) -> torch.Tensor:
        step_entered.set()
        release_step.wait()  # both sequences are in the batch when the step fails
        raise RuntimeError("a bug in a step of the batch")

    monkeypatch.setattr(SequenceSampler, "prepare_tensor_args", fail_the_step)
    try:
        finished: list[SequenceUpdate] = []
        done = threading.Semaphore(0)

        def on_update(update: SequenceUpdate) -> None:
            if update.finished:
                finished.append(update)
                done.release()

        engine.submit(PROMPT, greedy(), on_update=on_update)
        step_entered.wait()
        engine.submit(PROMPT, seeded(1), on_update=on_update)
        release_step.set()
        done.acquire()
        done.acquire()
        assert all(u.error and u.batch_failed for u in finished)
        with pytest.raises(EngineStopped, match="a bug in a step"):
            engine.check()  # from the moment the sequences heard
        told.wait()  # the loop's thread tells its listeners as it ends
        assert len(heard) == 1
        assert "a bug in a step" in heard[0]
        with pytest.raises(EngineStopped):
            engine.submit(PROMPT, greedy(), on_update=on_update)
        assert engine._sequences == {}
        late: list[str] = []
        engine.on_stopped(late.append)  # a listener that comes after hears at once
        assert late == heard
    finally:
        release_step.set()
        engine.close()


def test_closing_the_engine_tells_no_listener(tiny_gpt2: Path) -> None:
    engine = GenerationEngine(tiny_gpt2, device="cpu", max_sequences=2)
    engine.load()
    heard: list[str] = []
    engine.on_stopped(heard.append)
    engine.close()
    assert heard == []
