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
    generation_requests,
    length_record,
    parse_args,
    parse_variant_names,
    quick_config,
    stack_model_config,
    static_batches,
)
from benchmarks.generation_model import (
    GenerationRequest,
    TinyGptSpec,
    build_tiny_gpt,
    make_prompts,
    output_length_bounds,
    output_lengths,
    pair_requests,
    prompt_lengths,
    synthetic_sentences,
)
from benchmarks.generation_report import sequential_figures, static_figures, useful_token_share


def test_defaults_measure_every_variant_at_1_8_and_32_with_64_tokens() -> None:
    config = parse_args([])
    assert (config.levels, config.max_tokens, config.variants) == ((1, 8, 32), 64, VARIANTS)
    assert config.fixed_length is False  # lengths vary unless asked


def test_fixed_length_flag_is_parsed_and_kept_by_quick() -> None:
    assert parse_args(["--quick", "--fixed-length"]).fixed_length is True
    assert parse_args(["--quick"]).fixed_length is False


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


def test_cb_is_a_variant_run_alone_with_only_and_its_attention_can_be_set() -> None:
    assert "cb" in VARIANTS
    assert "cb" in quick_config().variants  # --quick runs it too
    config = parse_args(["--quick", "--only", "cb", "--cb-attention", "eager"])
    assert (config.variants, config.cb_attention) == (("cb",), "eager")
    assert parse_args([]).cb_attention == "sdpa"


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


def test_output_length_bounds_are_half_the_mean_either_side() -> None:
    assert output_length_bounds(64) == (32, 96)  # 64 / 2 and 3 x 64 / 2
    assert output_length_bounds(5) == (3, 7)  # 5 // 2 = 2 either side, centred on 5
    assert output_length_bounds(1) == (1, 1)
    with pytest.raises(ValueError, match="mean_tokens"):
        output_length_bounds(0)


def test_output_lengths_stay_in_bounds_and_average_exactly_the_mean() -> None:
    lengths = output_lengths(1000, mean_tokens=64, seed=2)
    assert min(lengths) == 32  # 1000 draws over 65 values reach both ends
    assert max(lengths) == 96
    assert sum(lengths) == 64 * 1000  # antithetic pairs: x + (128 - x) = 128 per pair
    assert sum(lengths[:40]) == 64 * 40  # so does every even-length run from an even index
    assert sum(lengths[8:16]) == 64 * 8  # a static batch of 8


def test_output_lengths_are_spread_over_the_whole_range() -> None:
    lengths = output_lengths(1000, mean_tokens=64, seed=2)
    quarter = sum(1 for n in lengths if n < 48) / 1000  # uniform: 16 of 65 values below 48
    assert quarter == pytest.approx(16 / 65, abs=0.05)
    assert len(set(lengths)) == 65  # every value from 32 to 96


def test_output_lengths_are_the_same_for_a_seed_and_differ_across_seeds() -> None:
    assert output_lengths(64, mean_tokens=64, seed=2) == output_lengths(64, mean_tokens=64, seed=2)
    assert output_lengths(64, mean_tokens=64, seed=2) != output_lengths(64, mean_tokens=64, seed=3)
    assert (
        output_lengths(3, mean_tokens=64, seed=2) == output_lengths(4, mean_tokens=64, seed=2)[:3]
    )


def test_pair_requests_pairs_by_index_and_refuses_unequal_lists() -> None:
    assert pair_requests(["a", "b"], [40, 88]) == [
        GenerationRequest("a", 40), GenerationRequest("b", 88),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="2 prompts but 1 lengths"):
        pair_requests(["a", "b"], [40])


def test_generation_requests_vary_lengths_unless_fixed_and_keep_the_prompts() -> None:
    prompts = [f"p{i}" for i in range(64)]
    varied = generation_requests(prompts, GenerationBenchConfig())
    fixed = generation_requests(prompts, GenerationBenchConfig(fixed_length=True))
    assert [r.prompt for r in varied] == [r.prompt for r in fixed] == prompts
    assert [r.max_tokens for r in varied] == output_lengths(64, mean_tokens=64, seed=2)
    assert {r.max_tokens for r in fixed} == {64}


def test_length_record_gives_min_mean_max_of_the_lengths_used() -> None:
    requests = pair_requests(["a", "b", "c", "d"], [40, 88, 32, 96])
    record = length_record(requests, GenerationBenchConfig())
    assert record == {
        "distribution": "uniform", "bounds": [32, 96], "seed": 2, "requests": 4,
        "max_tokens_min": 32, "max_tokens_mean": 64.0, "max_tokens_max": 96,
    }  # fmt: skip
    fixed = length_record(pair_requests(["a"], [64]), GenerationBenchConfig(fixed_length=True))
    assert (fixed["distribution"], fixed["bounds"], fixed["seed"]) == ("fixed", [64, 64], None)


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


def test_in_process_baselines_make_each_request_its_own_length(small_gpt) -> None:
    from benchmarks.generation_inprocess import InProcessGenerator

    runner = InProcessGenerator.load(small_gpt, threads=1, device="cpu")
    prompts = [p.text for p in make_prompts(small_gpt, count=4, min_tokens=8, max_tokens=16)]
    requests = pair_requests(prompts, [3, 7, 5, 5])
    services = runner.sequential(requests, count=3, warmup=1)
    assert [s.tokens for s in services] == [3, 7, 5]
    assert all(s.sent_ns < s.first_token_ns < s.done_ns for s in services)
    assert len(sequential_figures(services, 2).ttft_ns) == 1  # 3 requests - the first 2
    batches = runner.static(requests, batch_size=3, batches=2, warmup=0)
    # batch 0: lengths 3, 7, 5 run 7 steps; batch 1 wraps round: 5, 3, 7
    assert [b.tokens for b in batches] == [15, 15]  # 3 + 7 + 5 useful, padding aside
    assert [b.computed_tokens for b in batches] == [21, 21]  # 3 rows x the longest, 7
    assert useful_token_share(batches) == pytest.approx(30 / 42)
    assert len(static_figures(batches).ttft_ns) == 6


def test_transformers_cb_makes_each_request_its_own_length_greedily_past_eos(small_gpt) -> None:
    import torch

    from benchmarks.generation_cb import CbSettings, TransformersCbEngine
    from benchmarks.generation_inprocess import InProcessGenerator

    runner = InProcessGenerator.load(small_gpt, threads=1, device="cpu")
    model, tokenizer = runner.model, runner.tokenizer
    prompts = [p.text for p in make_prompts(small_gpt, count=4, min_tokens=8, max_tokens=16)]
    requests = pair_requests(prompts, [3, 40, 1, 17])
    expected = {}  # greedy generate, each to its own length
    for request in requests:
        ids = tokenizer(request.prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                ids, do_sample=False, max_new_tokens=request.max_tokens,
                min_new_tokens=request.max_tokens, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        expected[request.prompt] = out[0, ids.shape[1] :].tolist()
    # random weights never make <eos>; greedy, they repeat a token: call the 40-token answer's
    # last one the end of sequence, so a run that honoured the model's EOS would stop early
    fake_eos = expected[prompts[1]][-1]
    assert fake_eos in expected[prompts[1]][:-1]  # it comes before the 40th token too
    model.generation_config.eos_token_id = model.config.eos_token_id = fake_eos
    settings = CbSettings(max_sequences=4, kv_cache_tokens=4 * 128)
    attention = model.config._attn_implementation
    with TransformersCbEngine.start(model, tokenizer, settings) as engine:
        sent = {engine.submit(r): r for r in requests}
        finished = [engine.next_finished(timeout_s=30) for _ in requests]
    assert model.config._attn_implementation == attention  # put back by close
    assert all(f is not None and f.error is None and f.first_token_ns for f in finished)
    made = {sent[f.request_id].prompt: f.token_ids for f in finished}
    assert [len(made[r.prompt]) for r in requests] == [3, 40, 1, 17]  # each its own length
    assert made == {p: tuple(ids) for p, ids in expected.items()}  # and generate's tokens
