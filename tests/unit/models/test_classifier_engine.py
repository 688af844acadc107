from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.engines.classify import TensorClassifierEngine, save_family_model
from models.families.digits import DigitsConfig, build_digits


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_a_saved_digits_model_loads_and_gives_the_modules_probabilities(tmp_path: Path, arch):
    torch.manual_seed(0)
    config = DigitsConfig(arch=arch, hidden=16)
    model = build_digits(config).eval()
    save_family_model(model, config, tmp_path)
    engine = TensorClassifierEngine(tmp_path, device="cpu")
    engine.load()
    engine.warmup()
    pixels = np.random.default_rng(0).uniform(0, 16, size=(5, 64)).astype(np.float32)
    probabilities = engine.run(pixels)
    assert probabilities.shape == (5, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(pixels)), dim=-1).numpy()
    assert np.allclose(probabilities, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "words"),
    [
        (np.zeros((2, 63), dtype=np.float32), "shape"),
        (np.zeros((2, 8, 8), dtype=np.float32), "shape"),
        (np.zeros((0, 64), dtype=np.float32), "shape"),
        (np.zeros((2, 64), dtype=np.float64), "FP32"),
    ],
)
def test_wrong_shape_or_datatype_is_refused_naming_it(tmp_path: Path, batch, words):
    config = DigitsConfig()
    save_family_model(build_digits(config), config, tmp_path)
    engine = TensorClassifierEngine(tmp_path, device="cpu")
    engine.load()
    with pytest.raises(ValueError, match=words):
        engine.run(batch)


def test_a_config_of_another_family_is_refused():
    with pytest.raises(ValueError, match="family"):
        DigitsConfig.from_dict({"family": "gpt2", "arch": "mlp"})
    with pytest.raises(ValueError, match="arch"):
        DigitsConfig(arch="rnn")
