from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_folders import make_digits_folder, make_text_classifier_folder

from models.engines import build_engine
from models.engines.classify import (
    TensorClassifierEngine,
    TextClassifierEngine,
    save_family_model,
)
from models.errors import UnsafeWeights
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


# ---- transformers text classifiers, and how build_engine picks ------------------------

TEXTS = ["what a wonderful day", "this is terrible", "the train leaves at noon"]


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_classifier_folder(
        tmp_path_factory.mktemp("sentiment"), labels=("negative", "neutral", "positive")
    )


def _reference_probabilities(folder: Path, texts: list[str], *, multi_label: bool = False):
    """What the saved model says, computed the plain transformers way."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.inference_mode():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)).numpy()


def test_a_text_classifier_gives_the_models_softmax_with_labels_from_id2label(text_folder):
    engine = TextClassifierEngine(text_folder, device="cpu")
    engine.load()
    engine.warmup()
    probabilities = engine.run(TEXTS)
    assert engine.labels == ("negative", "neutral", "positive")
    assert probabilities.shape == (3, 3)
    assert probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(probabilities, _reference_probabilities(text_folder, TEXTS), atol=1e-6)
    # the wide head makes rows differ, so a row mix-up anywhere above would show
    assert not np.allclose(probabilities[0], probabilities[1], atol=1e-3)


def test_a_text_classifier_answers_each_row_the_same_alone_or_padded_in_a_batch(text_folder):
    engine = TextClassifierEngine(text_folder, device="cpu")
    engine.load()
    batched = engine.run(TEXTS)
    one_by_one = np.concatenate([engine.run([text]) for text in TEXTS])
    assert np.allclose(batched, one_by_one, atol=1e-5)


def test_a_text_longer_than_the_models_positions_is_truncated_not_refused(text_folder):
    engine = TextClassifierEngine(text_folder, device="cpu")
    engine.load()
    assert engine.max_length == 64  # the tiny model's max_position_embeddings
    assert engine.run(["word " * 500]).shape == (1, 3)


def test_a_multi_label_text_classifier_gives_one_sigmoid_per_label(tmp_path: Path):
    folder = make_text_classifier_folder(
        tmp_path / "tags", labels=("a", "b"), problem_type="multi_label_classification"
    )
    engine = TextClassifierEngine(folder, device="cpu")
    engine.load()
    scores = engine.run(TEXTS)
    assert np.allclose(scores, _reference_probabilities(folder, TEXTS, multi_label=True), atol=1e-6)


def test_a_regression_head_is_refused_as_a_classifier(tmp_path: Path):
    folder = make_text_classifier_folder(
        tmp_path / "score", labels=("score",), problem_type="regression"
    )
    with pytest.raises(ValueError, match="regression"):
        TextClassifierEngine(folder, device="cpu").load()


def test_a_text_classifier_folder_with_pickle_weights_is_refused(text_folder, tmp_path: Path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(text_folder, folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeWeights, match="pytorch_model.bin"):
        TextClassifierEngine(folder, device="cpu").load()


def test_build_engine_picks_the_tensor_engine_for_a_loom_family_else_transformers(
    text_folder, tmp_path: Path
):
    digits_folder = make_digits_folder(tmp_path / "digits")
    tensor = build_engine("classify", digits_folder, device="cpu", dtype="auto", num_threads=1)
    text = build_engine("classify", text_folder, device="cpu", dtype="auto", num_threads=1)
    assert isinstance(tensor, TensorClassifierEngine)
    assert tensor.input_kind == "tensor"
    assert isinstance(text, TextClassifierEngine)
    assert text.input_kind == "text"


def test_a_folder_naming_an_unknown_family_fails_to_load_naming_it(tmp_path: Path):
    folder = make_digits_folder(tmp_path / "other")
    (folder / "config.json").write_text('{"family": "pixels", "arch": "mlp"}')
    engine = build_engine("classify", folder, device="cpu")
    with pytest.raises(ValueError, match="pixels"):
        engine.load()
