"""Devices, dtypes and safe loading: what a machine cannot honour fails early and clearly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.device import resolve_device, resolve_dtype
from models.engines import EmbeddingEngine, Engine, GenerationEngine, build_engine
from models.errors import UnsafeWeights
from models.loading import load_pretrained

MakeModelDir = Callable[..., Path]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("no_cuda")
def test_auto_device_is_the_cpu_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_asking_for_cuda_without_it_is_a_clear_error(spec: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(spec)


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_auto_dtype_is_float32_on_the_cpu_and_float16_on_cuda() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("spec", ["float16", "bfloat16"])
def test_half_precision_on_the_cpu_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="on the CPU is not supported"):
        resolve_dtype(spec, torch.device("cpu"))


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


def test_load_pretrained_refuses_a_folder_with_pickle_weights(
    make_model_dir: MakeModelDir,
) -> None:
    folder = make_model_dir(extra={"pytorch_model.bin": b"\x80\x04"})

    with pytest.raises(UnsafeWeights, match=r"pytorch_model\.bin"):
        load_pretrained(folder, task="embed", device=torch.device("cpu"), dtype=torch.float32)


def test_build_engine_makes_each_tasks_engine_and_refuses_other_tasks(tmp_path: Path) -> None:
    engine = build_engine("embed", tmp_path, device="cpu")

    assert isinstance(engine, EmbeddingEngine)
    assert isinstance(engine, Engine)
    assert engine.task == "embed"
    generator = build_engine("generate", tmp_path, device="cpu", max_sequences=4)
    assert isinstance(generator, GenerationEngine)
    assert isinstance(generator, Engine)
    assert generator.max_sequences == 4
    with pytest.raises(ValueError, match="task translate is not served yet"):
        build_engine("translate", tmp_path)
