"""Classifiers: rows of features or texts in, class probabilities out.

Two engines share one shape (``load``, ``warmup``, ``run(batch) -> (n, classes)`` float32,
``labels`` naming the columns, ``input_kind`` saying what a row is):

- ``TensorClassifierEngine``: Loom's own families (``config.json`` naming the family, plus
  ``model.safetensors``); FP32 ``[n, features]`` in.
- ``TextClassifierEngine``: a transformers sequence-classification folder (safetensors only,
  no remote code); texts in, labels from the config's ``id2label``.

``is_family_folder`` tells them apart; ``build_engine("classify", ...)`` uses it.

    engine = TensorClassifierEngine(model_dir); engine.load(); engine.warmup()
    probabilities = engine.run(np.zeros((2, 64), dtype=np.float32))   # (2, 10), rows sum to 1
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from models.engines.base import DeviceEngine, PretrainedEngine
from models.families import digits
from models.loading import pick_max_length
from models.weights import require_safe_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FAMILY_KEY = "family"
"""The config key naming a Loom family; transformers configs have ``model_type`` instead."""

InputKind = Literal["tensor", "text"]

_WARMUP_TEXTS = ("Hello.", "A slightly longer sentence, so the warm-up batch has padding.")


def save_family_model(model: torch.nn.Module, config: digits.DigitsConfig, folder: Path) -> None:
    """Write a family model as Loom stores it: safetensors weights and its JSON config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))


def is_family_folder(model_dir: Path) -> bool:
    """True when ``model_dir``'s config names a Loom family (``{"family": "digits", ...}``).

    A folder without a readable JSON config is not one of ours; transformers reports it."""
    try:
        config = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and FAMILY_KEY in config


class TensorClassifierEngine(DeviceEngine):
    """Classifies FP32 feature rows with a Loom family model (today: ``digits``)."""

    task = "classify"
    input_kind: InputKind = "tensor"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
        devices: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            model_dir, device=device, dtype=dtype, num_threads=num_threads, devices=devices
        )
        if self.is_split:
            raise ValueError(
                f"{model_dir} is a Loom family model (small, no layer stack): it runs on one "
                f"device, not split across {[str(d) for d in self.devices]}"
            )
        self._model: torch.nn.Module | None = None
        self.input_features = digits.INPUT_FEATURES
        self.num_classes = digits.NUM_CLASSES
        self.labels: tuple[str, ...] = tuple(str(digit) for digit in range(digits.NUM_CLASSES))

    def load(self) -> None:
        self._set_threads()
        require_safe_weights(self.model_dir)
        config = digits.DigitsConfig.from_dict(
            json.loads((self.model_dir / CONFIG_FILE).read_text())
        )
        model = digits.build_digits(config)
        model.load_state_dict(load_file(str(self.model_dir / WEIGHTS_FILE)))
        self._model = model.to(self.device, self.dtype).eval()

    def warmup(self) -> None:
        self.run(np.zeros((2, self.input_features), dtype=np.float32))

    def check_input(self, batch: np.ndarray) -> None:
        """Refuse anything but FP32 ``[n, features]`` with n >= 1, naming what came."""
        if batch.dtype != np.float32:
            raise ValueError(f"input must be FP32, got {batch.dtype}")
        if batch.ndim != 2 or batch.shape[1] != self.input_features or batch.shape[0] < 1:
            raise ValueError(
                f"input must have shape [n, {self.input_features}], got {list(batch.shape)}"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes), float32, each row summing to 1."""
        if self._model is None:
            raise RuntimeError("TensorClassifierEngine.load() must be called first")
        self.check_input(batch)
        with torch.inference_mode():
            logits = self._model(torch.from_numpy(batch).to(self.device, self.dtype))
            return torch.softmax(logits.float(), dim=-1).cpu().numpy()


class TextClassifierEngine(PretrainedEngine):
    """Classifies texts with a transformers ``*ForSequenceClassification`` folder.

    Single-label models give a softmax over the labels (rows sum to 1); models whose config
    says ``problem_type: multi_label_classification`` give one sigmoid per label. Regression
    heads are refused: they have no labels. Texts longer than ``max_length`` tokens are
    truncated.

        engine = TextClassifierEngine(model_dir, device="cpu"); engine.load()
        engine.run(["great film", "dull film"])    # (2, num_labels); engine.labels names them
    """

    task = "classify"
    input_kind: InputKind = "text"
    input_features = None

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        num_threads: int | None = None,
        devices: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            model_dir, device=device, dtype=dtype, num_threads=num_threads, devices=devices
        )
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, not {max_length}")
        self._requested_max_length = max_length
        self._multi_label = False
        self.max_length = 0
        self.labels: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def load(self) -> None:
        """Load the model and tokenizer (safetensors only, no remote code), in eval mode."""
        loaded = self._load_pretrained()
        config = loaded.model.config
        if config.problem_type == "regression":
            raise ValueError(f"{self.model_dir} has a regression head, not a classifier")
        self._multi_label = config.problem_type == "multi_label_classification"
        # id2label maps column index -> name: {0: "negative", 1: "positive"}; transformers
        # makes the keys ints when it loads a config, but types them as either
        if config.id2label is None or config.num_labels is None:
            raise ValueError(f"{self.model_dir} has a classifier config with no labels")
        names = {int(index): name for index, name in config.id2label.items()}
        self.labels = tuple(str(names[i]) for i in range(config.num_labels))
        self.max_length = pick_max_length(loaded, self._requested_max_length)
        self._loaded = loaded

    def warmup(self) -> None:
        self.run(_WARMUP_TEXTS)

    def run(self, texts: Sequence[str]) -> np.ndarray:
        """Label probabilities (n, num_labels), float32, in input order."""
        loaded = self._require_loaded()
        items = list(texts)
        if not items:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        for index, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"input {index} is {type(text).__name__}, not str")
        batch = loaded.tokenizer(
            items, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with torch.inference_mode():
            logits = loaded.model(**batch).logits.float()  # (B, num_labels)
            scores = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, -1)
        return scores.cpu().numpy()
