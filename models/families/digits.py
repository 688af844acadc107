"""The ``digits`` family: classifiers of 8x8 grey images (scikit-learn's handwritten digits,
pixels 0-16) into 10 classes. Input FP32 ``[n, 64]``, output logits ``[n, 10]``.

    model = build_digits(DigitsConfig(arch="cnn"))
    logits = model(torch.rand(4, 64) * 16)   # (4, 10)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

FAMILY = "digits"
INPUT_FEATURES = 64  # 8 x 8 pixels, row-major
NUM_CLASSES = 10


@dataclass(frozen=True, kw_only=True)
class DigitsConfig:
    arch: Literal["mlp", "cnn"] = "mlp"
    """mlp: two hidden layers; cnn: two 3x3 convolutions, then a linear head."""
    hidden: int = 64
    """Width of the MLP's hidden layers, or the CNN's channels in its second convolution."""
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ("mlp", "cnn"):
            raise ValueError(f"digits arch must be mlp or cnn, not {self.arch!r}")
        if self.hidden < 1 or not 0 <= self.dropout < 1:
            raise ValueError("digits hidden must be >= 1 and dropout in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON: ``{"family": "digits", "arch": "mlp", ...}``."""
        return {"family": FAMILY, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DigitsConfig:
        """From parsed JSON; field values are checked by ``__post_init__``."""
        if data.get("family") != FAMILY:
            raise ValueError(f"config names family {data.get('family')!r}, not {FAMILY!r}")
        fields = {k: v for k, v in data.items() if k != "family"}
        return cls(**fields)


class DigitsMLP(nn.Module):
    def __init__(self, config: DigitsConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(INPUT_FEATURES, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, NUM_CLASSES),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(pixels / 16.0)  # (N, 64) in 0..16 -> (N, 10) logits
        return logits


class DigitsCNN(nn.Module):
    def __init__(self, config: DigitsConfig) -> None:
        super().__init__()
        channels = config.hidden
        self.features = nn.Sequential(
            nn.Conv2d(1, channels // 2 or 1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels // 2 or 1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, C, 8, 8) -> (N, C, 4, 4)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(channels * 16, NUM_CLASSES)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels / 16.0).view(-1, 1, 8, 8)  # (N, 64) -> (N, 1, 8, 8)
        logits: torch.Tensor = self.head(self.features(images))  # (N, 10)
        return logits


def build_digits(config: DigitsConfig) -> nn.Module:
    return DigitsMLP(config) if config.arch == "mlp" else DigitsCNN(config)
