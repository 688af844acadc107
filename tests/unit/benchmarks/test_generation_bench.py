"""The generation benchmark's command line, presets and stack config, the tiny GPT-2 it builds,
and the in-process baselines on a smaller one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from benchmarks.generation import (
    VARIANTS,
    GenerationBenchConfig,
    default_out_path,
    parse_args,
    parse_variant_names,
    quick_config,
    stack_model_config,
    static_batches,
)
from benchmarks.generation_model import (
    TinyGptSpec,
    build_tiny_gpt,
    make_prompts,
    prompt_lengths,
    synthetic_sentences,
)
from benchmarks.generation_report import sequential_figures, static_figures


def test_defaults_measure_every_variant_at_1_8_and_32_with_64_tokens() -> None:
    config = parse_args([])
    assert (config.levels, config.max_tokens, config.variants) == ((1, 8, 32), 64, VARIANTS)


def test_quick_is_the_quick_preset_and_explicit_options_still_win() -> None:
    config = parse_args(["--quick", "--requests", "5", "--concurrency", "1,4"])
    assert config.duration_s == quick_config().duration_s
    assert (config.requests, config.levels) == (5, (1, 4))


def test_only_and_model_set_and_env_are_parsed() -> None:
    config = parse_args(
        ["--only", "stack,sequential", "--model-set", "replicas=2", "--env", "RAY_X=1"]
    )
    assert config.variants == ("stack", "sequential")
    assert config.model_overrides == {"replicas": 2}  # YAML-typed: the int 2
    assert config.stack_env == {"RAY_X": "1"}


def test_an_unknown_variant_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--only", "vllm"])


def test_parse_variant_names_keeps_order_and_drops_duplicates() -> None:
    assert parse_variant_names("static, stack,static") == ("static", "stack")
    with pytest.raises(ValueError, match="no variants"):
        parse_variant_names(" , ")


def test_config_refuses_zero_tokens() -> None:
    with pytest.raises(ValueError, match="max-tokens"):
        GenerationBenchConfig(max_tokens=0)


def test_default_out_path_is_stamped_with_utc_time() -> None:
    now = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert default_out_path(now).name == "generation-20250102T030405Z.json"


def test_stack_config_serves_one_generate_replica_with_the_in_process_threads() -> None:
    config = GenerationBenchConfig(threads=2, model_overrides={"replicas": 3})
    (model,) = stack_model_config(config)["models"]
    assert model == {
        "name": "tinygpt", "source": "tinygpt", "task": "generate", "replicas": 3,
        "num_cpus": 2, "torch_threads": 2,
    }  # fmt: skip


def test_static_batches_cover_the_requests_and_never_fall_below_the_minimum() -> None:
    assert static_batches(32, 8, 3) == 4  # 32 / 8
    assert static_batches(32, 32, 3) == 3  # 1 batch would do; the minimum is 3
    assert static_batches(30, 8, 1) == 4  # ceil(3.75)


def test_prompt_lengths_spread_over_the_range_by_sevens() -> None:
    assert prompt_lengths(6, 32, 64) == [32, 39, 46, 53, 60, 34]  # 67 wraps: 32 + 35 % 33
    with pytest.raises(ValueError, match="min_tokens"):
        prompt_lengths(3, 10, 5)


def test_synthetic_sentences_are_ascii_and_the_same_for_a_seed() -> None:
    sentences = synthetic_sentences(3, 50)
    assert sentences == synthetic_sentences(3, 50)
    assert all(s.isascii() and s.endswith(".") for s in sentences)


SMALL = TinyGptSpec(n_layer=1, n_embd=32, n_head=2, vocab_size=400, n_positions=128,
                    corpus_sentences=500)  # fmt: skip


@pytest.fixture(scope="module")
def small_gpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small-gpt")
    build_tiny_gpt(folder, SMALL)
    return folder


def test_build_tiny_gpt_saves_safetensors_and_a_tokenizer_of_the_asked_size(small_gpt) -> None:
    from transformers import AutoTokenizer

    assert (small_gpt / "model.safetensors").is_file()
    assert not list(small_gpt.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(str(small_gpt))
    assert len(tokenizer) == 400
    assert tokenizer.pad_token == "<pad>"


def test_make_prompts_reach_their_target_lengths(small_gpt) -> None:
    prompts = make_prompts(small_gpt, count=5, min_tokens=8, max_tokens=16)
    targets = prompt_lengths(5, 8, 16)
    assert all(target <= p.tokens <= target + 4 for p, target in zip(prompts, targets, strict=True))
    assert len({p.text for p in prompts}) == 5


def test_in_process_baselines_make_exactly_n_tokens_per_request(small_gpt) -> None:
    from benchmarks.generation_inprocess import InProcessGenerator

    runner = InProcessGenerator.load(small_gpt, threads=1, device="cpu")
    prompts = [p.text for p in make_prompts(small_gpt, count=4, min_tokens=8, max_tokens=16)]
    services = runner.sequential(prompts, max_new_tokens=5, count=3, warmup=1)
    assert [s.tokens for s in services] == [5, 5, 5]
    assert all(s.sent_ns < s.first_token_ns < s.done_ns for s in services)
    assert len(sequential_figures(services, 2).ttft_ns) == 1  # 3 requests - the first 2
    batches = runner.static(prompts, max_new_tokens=5, batch_size=3, batches=2, warmup=0)
    assert [b.tokens for b in batches] == [15, 15]  # 3 prompts x 5 tokens, padding aside
    assert len(static_figures(batches).ttft_ns) == 6
