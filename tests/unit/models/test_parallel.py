"""Model-parallel sharding (``models.parallel``): the stage plan, the split model's outputs
against the unsplit model's, and engines given several devices.

Two CPU stages run every hook with nothing to move; the ``meta`` device stands in for a second
device where a test needs tensors to really change device (placement, tied weights, the input
hooks); the GPU test runs across every visible GPU and skips with fewer than two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_folders import make_tiny_gpt2_folder
from torch import nn

from models.bundled import bundled_model_dir
from models.engines import EmbeddingEngine, GenerationEngine, build_engine
from models.engines.generate import SamplingParams
from models.parallel import StagePlan, find_layer_stack, plan_stages, split_across_devices

CUDA_COUNT = torch.cuda.device_count()
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Loom splits a model's layers across devices, one stage per device.",
]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2_folder(tmp_path_factory.mktemp("tiny-gpt2"))


def load_gpt2(folder: Path) -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder, use_safetensors=True).eval()


class Toy(nn.Module):
    """embed -> 4 blocks -> head, small enough to place on ``meta``."""

    def __init__(self, widths: tuple[int, ...] = (4, 4, 4, 4)) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4, bias=width > 4) for width in widths)
        self.head = nn.Linear(4, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


# ---- the plan ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "n_devices", "expected"),
    [
        ([10] * 6, 2, [range(0, 3), range(3, 6)]),  # 30 | 30
        ([10] * 6, 3, [range(0, 2), range(2, 4), range(4, 6)]),  # 20 | 20 | 20
        ([10] * 5, 2, [range(0, 3), range(3, 5)]),  # 30 | 20: earlier stages take the extra
        ([40, 10, 10, 10], 2, [range(0, 1), range(1, 4)]),  # 40 | 30, not 50 | 20
        ([10, 10, 10, 40], 2, [range(0, 3), range(3, 4)]),  # 30 | 40
        ([5, 1, 1, 1, 1, 5], 3, [range(0, 1), range(1, 5), range(5, 6)]),  # 5 | 4 | 5
        ([7, 7, 7], 3, [range(0, 1), range(1, 2), range(2, 3)]),  # one layer a stage
        ([0, 0, 0, 0], 2, [range(0, 3), range(3, 4)]),  # no weights: still one layer each
        ([3, 1, 4], 1, [range(0, 3)]),  # one device holds everything
    ],
)
def test_plan_stages_cuts_contiguous_stages_with_the_smallest_largest_stage(
    counts: list[int], n_devices: int, expected: list[range]
) -> None:
    assert plan_stages(counts, n_devices) == expected


def test_plan_stages_refuses_more_devices_than_layers() -> None:
    with pytest.raises(ValueError, match="3 devices but only 2 layers"):
        plan_stages([10, 10], 3)


@pytest.mark.parametrize(("counts", "n_devices"), [([10], 0), ([10, -1], 1)])
def test_plan_stages_refuses_no_devices_and_negative_counts(
    counts: list[int], n_devices: int
) -> None:
    with pytest.raises(ValueError, match="at least one device|cannot be negative"):
        plan_stages(counts, n_devices)


def test_the_layer_stack_is_the_largest_list_of_same_type_blocks(tiny_gpt2: Path) -> None:
    path, layers = find_layer_stack(load_gpt2(tiny_gpt2))
    assert (path, len(layers)) == ("transformer.h", 2)


def test_a_model_without_a_layer_stack_is_refused_naming_its_class() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Sequential has no stack of repeated layers"):
        split_across_devices(model, ["cpu", "cpu"])


def test_a_list_of_mixed_block_types_is_not_a_layer_stack() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)])

    with pytest.raises(ValueError, match="Mixed has no stack"):
        split_across_devices(Mixed(), ["cpu"])


def test_more_devices_than_layers_is_refused_naming_the_stack(tiny_gpt2: Path) -> None:
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel\.transformer\.h: 3 devices"):
        split_across_devices(load_gpt2(tiny_gpt2), ["cpu", "cpu", "cpu"])


# ---- placement, on a real second device (meta) --------------------------------------------


def test_stages_embeddings_and_head_land_on_their_planned_devices() -> None:
    # block parameter counts 16, 16, 20, 20 (a bias on the last two): best cut 32 | 40
    model = split_across_devices(Toy(widths=(4, 4, 8, 8)), ["cpu", "meta"])
    plan: StagePlan = model.loom_stages
    assert plan.layer_ranges == (range(0, 2), range(2, 4))
    assert plan.stage_param_counts == (32, 40)
    assert (plan.before_stack, plan.after_stack) == (("embed",), ("head",))
    devices = [next(block.parameters()).device.type for block in model.blocks]
    assert devices == ["cpu", "cpu", "meta", "meta"]
    assert model.embed.weight.device.type == "cpu"
    assert model.head.weight.device.type == "meta"
    assert plan.device_of_layer(3) == torch.device("meta")


def test_each_stage_moves_its_tensor_inputs_args_and_kwargs_to_its_device() -> None:
    model = split_across_devices(Toy(), ["cpu", "meta"])
    hidden = torch.ones(1, 4)
    assert model.blocks[3](hidden).device.type == "meta"  # a cpu tensor in, run on meta
    assert model.blocks[3](input=hidden).device.type == "meta"


def test_a_weight_tied_across_two_devices_gets_a_copy_on_the_later_device(
    tiny_gpt2: Path,
) -> None:
    model = split_across_devices(load_gpt2(tiny_gpt2), ["cpu", "meta"])
    assert model.transformer.wte.weight.device.type == "cpu"
    assert model.lm_head.weight.device.type == "meta"
    assert model.transformer.h[0].attn.c_attn.weight.device.type == "cpu"
    assert model.transformer.h[1].attn.c_attn.weight.device.type == "meta"
    assert model.transformer.ln_f.weight.device.type == "meta"


def test_a_model_is_split_only_once(tiny_gpt2: Path) -> None:
    model = split_across_devices(load_gpt2(tiny_gpt2), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="already split"):
        split_across_devices(model, ["cpu", "cpu"])


# ---- outputs equal the unsplit model's ----------------------------------------------------


def test_gpt2_split_over_two_cpu_stages_gives_the_unsplit_logits_and_generation(
    tiny_gpt2: Path,
) -> None:
    reference = load_gpt2(tiny_gpt2)
    model = split_across_devices(load_gpt2(tiny_gpt2), ["cpu", "cpu"])
    assert model.loom_stages.layer_ranges == (range(0, 1), range(1, 2))  # 2 equal blocks
    assert model.lm_head.weight is model.transformer.wte.weight  # one device: the tie holds
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.transformer.h)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding on row 2
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        split = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(split, expected, rtol=0, atol=0)
        greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 1}
        assert model.generate(ids, **greedy).tolist() == reference.generate(ids, **greedy).tolist()


def test_minilm_embeddings_over_two_cpu_stages_equal_one_device_vectors() -> None:
    one = EmbeddingEngine(bundled_model_dir(), device="cpu")
    two = build_engine("embed", bundled_model_dir(), devices=["cpu", "cpu"])
    one.load()
    two.load()
    model = two._require_loaded().model
    assert model.loom_stages.layer_path == "encoder.layer"
    assert model.loom_stages.layer_ranges == (range(0, 3), range(3, 6))  # 6 equal layers
    np.testing.assert_allclose(two.run(TEXTS).vectors, one.run(TEXTS).vectors, rtol=0, atol=1e-5)


def test_generation_engine_on_two_cpu_stages_equals_one_stage_greedily(tiny_gpt2: Path) -> None:
    params = SamplingParams(max_tokens=10, temperature=0)
    prompts = [("the quick brown", params), ("once upon a time", params)]
    results = []
    for devices in (["cpu"], ["cpu", "cpu"]):
        engine = GenerationEngine(tiny_gpt2, devices=devices, max_sequences=2)
        engine.load()
        try:
            results.append([g.token_ids for g in engine.run(prompts)])
        finally:
            engine.close()
    assert results[1] == results[0]
    assert all(len(ids) > 0 for ids in results[0])


# ---- the devices keyword ------------------------------------------------------------------


@pytest.mark.skipif(CUDA_COUNT < 1, reason="needs a CUDA device: only cpu resolves here")
def test_devices_that_disagree_with_device_are_refused() -> None:
    with pytest.raises(ValueError, match="disagree"):
        EmbeddingEngine(bundled_model_dir(), device="cuda:0", devices=["cpu", "cpu"])


def test_a_family_classifier_refuses_to_be_split(tmp_path: Path) -> None:
    from model_folders import make_digits_folder

    folder = make_digits_folder(tmp_path / "digits")
    with pytest.raises(ValueError, match="runs on one device"):
        build_engine("classify", folder, devices=["cpu", "cpu"])


# ---- across GPUs --------------------------------------------------------------------------


@pytest.mark.skipif(CUDA_COUNT < 2, reason=f"needs 2+ CUDA devices, {CUDA_COUNT} visible")
def test_gpt2_split_across_every_visible_gpu_gives_the_unsplit_logits(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    n_gpus = CUDA_COUNT
    config = GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2 * n_gpus, n_head=2,
        eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    reference = GPT2LMHeadModel(config).eval().to("cuda:0")
    model = GPT2LMHeadModel(config).eval()
    model.load_state_dict(reference.state_dict())
    devices = [f"cuda:{index}" for index in range(n_gpus)]
    split_across_devices(model, devices)
    assert model.transformer.h[-1].attn.c_attn.weight.device == torch.device(devices[-1])
    ids = torch.randint(0, 300, (2, 16), device="cuda:0")
    with torch.inference_mode():
        logits = model(ids).logits
        assert logits.device == torch.device("cuda:0")  # outputs come back where inputs went
        torch.testing.assert_close(logits, reference(ids).logits)
        greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        assert model.generate(ids, **greedy).tolist() == reference.generate(ids, **greedy).tolist()
    with pytest.raises(ValueError, match="KV cache on one device"):
        GenerationEngine(make_tiny_gpt2_folder(tmp_path / "gpt2"), devices=devices)
