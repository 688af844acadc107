"""Fixtures for the models tests: tiny model folders made on the spot, and empty stores."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.store import ModelStore

MakeModelDir = Callable[..., Path]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def make_model_dir(tmp_path: Path) -> MakeModelDir:
    """Make a small fake model folder: safetensors weights, a config, a pooling subfolder.

    ``seed`` changes the weights (so two folders hash differently); ``extra`` adds files,
    relative path -> bytes.
    """
    counter = iter(range(1_000_000))

    def make(seed: int = 0, extra: dict[str, bytes] | None = None) -> Path:
        folder = tmp_path / f"source-{next(counter)}"
        folder.mkdir()
        generator = torch.Generator().manual_seed(seed)
        save_file(
            {"embeddings.weight": torch.randn(8, 4, generator=generator)},
            str(folder / "model.safetensors"),
        )
        (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"pooling_mode_mean_tokens": True})
        )
        for rel, data in (extra or {}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        return folder

    return make
