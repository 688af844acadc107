"""Tensor classifiers of Loom's own families: FP32 ``[n, features]`` -> probabilities.

A folder holds ``config.json`` (naming the family) and ``model.safetensors``. Shapes are
checked before anything is allocated on the device.

    engine = TensorClassifierEngine(model_dir); engine.load(); engine.warmup()
    probabilities = engine.run(np.zeros((2, 64), dtype=np.float32))   # (2, 10), rows sum to 1
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from models.device import resolve_device
from models.families import digits
from models.weights import require_safe_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_family_model(model: torch.nn.Module, config: digits.DigitsConfig, folder: Path) -> None:
    """Write a family model as Loom stores it: safetensors weights and its JSON config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))


class TensorClassifierEngine:
    task = "classify"

    def __init__(self, model_dir: Path, *, device: str = "auto", num_threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self._num_threads = num_threads
        self._model: torch.nn.Module | None = None
        self.input_features = digits.INPUT_FEATURES
        self.num_classes = digits.NUM_CLASSES

    def load(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        require_safe_weights(self.model_dir)
        config = digits.DigitsConfig.from_dict(
            json.loads((self.model_dir / CONFIG_FILE).read_text())
        )
        model = digits.build_digits(config)
        model.load_state_dict(load_file(str(self.model_dir / WEIGHTS_FILE)))
        self._model = model.to(self.device).eval()

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
            logits = self._model(torch.from_numpy(batch).to(self.device))
            return torch.softmax(logits.float(), dim=-1).cpu().numpy()
