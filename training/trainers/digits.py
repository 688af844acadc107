"""The ``digits`` trainer: small classifiers on scikit-learn's bundled handwritten digits.

Two ways in, one data set (``load_digits``: 1797 images, 8x8, pixels 0..16, 10 classes):

- a *member* of a sweep, trained whole in one process, epoch by epoch (the pipeline's members
  stage runs one per work item), then exported as a folder serving loads:

      split = load_digits_split(seed=0)
      member = train_digits_member("cnn", DigitsHyperparameters(), split, seed=0)
      export_digits(member, workspace.member_dir("cnn"))   # TensorClassifierEngine loads it

- a ``TrainProgram`` (``DigitsTrainProgram``, kind ``digits``) that the coordinated train stage
  runs step by step on W data-parallel workers (``training.coordinated``).

Everything is seeded: the split, the initial weights and the batch order, so a run repeats
exactly on the CPU. Ray-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models.families.digits import DigitsConfig, build_digits
from training.program import TrainingStopped
from training.trainers.digits_spec import DigitsArch, DigitsHyperparameters
from training.workspace import atomic_path


@dataclass(frozen=True)
class DigitsSplit:
    """The train and validation rows: pixels float32 ``(n, 64)`` in 0..16, labels int64 ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def load_digits_split(*, seed: int, val_fraction: float = 0.2) -> DigitsSplit:
    """The bundled digits, split stratified by class: every digit keeps its share in both parts.

    1797 rows at ``val_fraction=0.2``: 1437 train, 360 validation. The same seed gives the same
    split in every process (a worker rebuilds it rather than receiving it).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    digits = load_digits()
    pixels = digits.data.astype(np.float32)  # (1797, 64), 0..16
    labels = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        pixels, labels, test_size=val_fraction, random_state=seed, stratify=labels
    )
    return DigitsSplit(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)


# --- a sweep member, trained whole ------------------------------------------------------------


@dataclass(frozen=True)
class TrainedMember:
    """One trained architecture of a sweep: its model (eval mode) and how it did."""

    arch: str
    config: DigitsConfig
    model: nn.Module
    metrics: dict[str, float]
    """``val_accuracy`` (0..1), ``train_loss`` (mean over the last epoch), ``epochs`` run."""


def evaluate_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The share of rows of ``x`` whose arg-max class is ``y``, in eval mode (no dropout).

    Leaves the model in the mode it found it in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            predicted = model(torch.from_numpy(x)).argmax(dim=-1).numpy()
    finally:
        model.train(was_training)
    return float((predicted == y).mean())


def train_digits_member(
    arch: DigitsArch,
    hp: DigitsHyperparameters,
    split: DigitsSplit,
    *,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainedMember:
    """Train one ``arch`` for ``hp.epochs`` full passes over ``split``'s training rows.

    Adam at ``hp.learning_rate``, minibatches of ``hp.batch_size`` in an order shuffled by a
    generator seeded with ``seed``; weights and dropout seeded too, inside a forked torch RNG
    so the caller's global state is untouched. ``should_stop`` is polled before each epoch and
    ``TrainingStopped`` raised when it says so; ``on_epoch(epoch, mean_loss)`` (epoch 1-based)
    follows each one. Returns the model in eval mode with its validation accuracy.
    """
    config = DigitsConfig(arch=arch, hidden=hp.hidden)
    order_rng = np.random.default_rng(seed)
    x_train = torch.from_numpy(split.x_train)
    y_train = torch.from_numpy(split.y_train)
    n_train = len(y_train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_digits(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=hp.learning_rate)
        model.train()
        epoch_loss = float("nan")
        for epoch in range(hp.epochs):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"digits {arch}: stopped before epoch {epoch + 1}")
            order = torch.from_numpy(order_rng.permutation(n_train))
            total_loss = 0.0
            # 1437 rows / 64 per batch = 22 full batches + one of 29
            for start in range(0, n_train, hp.batch_size):
                rows = order[start : start + hp.batch_size]
                loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(rows)
            epoch_loss = total_loss / n_train
            if on_epoch is not None:
                on_epoch(epoch + 1, epoch_loss)
    model.eval()
    metrics = {
        "val_accuracy": evaluate_accuracy(model, split.x_val, split.y_val),
        "train_loss": epoch_loss,
        "epochs": float(hp.epochs),
    }
    return TrainedMember(arch=arch, config=config, model=model, metrics=metrics)


def export_digits(member: TrainedMember, out_dir: Path) -> Path:
    """Write ``member`` as a model folder (``config.json`` + ``model.safetensors``) at ``out_dir``.

    Written beside and renamed into place, so ``out_dir`` is either the old folder or the
    whole new one, never half. ``TensorClassifierEngine(out_dir)`` loads it. Returns ``out_dir``.
    """
    # imported here: models.engines pulls in transformers (~3.7 s cold on this machine), which
    # every coordinated worker would otherwise pay at start only to run the program
    from models.engines.classify import save_family_model

    with atomic_path(out_dir) as temp:
        save_family_model(member.model, member.config, temp)
    return out_dir


# --- the program the coordinated train stage runs ----------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DigitsProgramParams:
    """The ``params`` of ``ProgramSpec(kind="digits", ...)``; unknown keys are refused."""

    arch: DigitsArch = "mlp"
    """``mlp`` or ``cnn``."""
    hidden: int = 64
    learning_rate: float = 1e-3
    """Adam's rate, constant over the steps."""
    batch_size: int = 64
    """Global batch in rows per optimiser step, split evenly over the workers."""
    max_steps: int = 200
    seed: int = 0
    """Seeds the split, the weights and every step's batch."""
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_steps < 1 or self.learning_rate <= 0:
            raise ValueError("digits program: batch_size, max_steps >= 1 and learning_rate > 0")


@dataclass(frozen=True)
class DigitsBatch:
    """One rank's rows of a global batch."""

    pixels: torch.Tensor
    """float32 ``(b, 64)``."""
    labels: torch.Tensor
    """int64 ``(b,)``."""


class DigitsTrainProgram:
    """The digits classifier as a ``TrainProgram``: deterministic (dropout 0), seeded batches.

    program = DigitsTrainProgram.from_params({"arch": "mlp", "batch_size": 32})
    model = program.build_model()
    loss = program.loss(model, program.batch(0, rank=1, world_size=2))  # rows 16..31
    """

    def __init__(self, params: DigitsProgramParams) -> None:
        self.params = params
        self.config = DigitsConfig(arch=params.arch, hidden=params.hidden, dropout=0.0)
        self.max_steps = params.max_steps
        self.global_batch_size = params.batch_size
        self.split = load_digits_split(seed=params.seed, val_fraction=params.val_fraction)
        if params.batch_size > len(self.split.y_train):
            raise ValueError(
                f"digits program: batch_size {params.batch_size} exceeds the "
                f"{len(self.split.y_train)} training rows"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DigitsTrainProgram:
        known = {f.name for f in fields(DigitsProgramParams)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"digits program: unknown params {unknown}; known: {sorted(known)}")
        return cls(DigitsProgramParams(**params))

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            return build_digits(self.config)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.params.learning_rate)

    def learning_rate(self, step: int) -> float:
        return self.params.learning_rate

    def global_batch_rows(self, step: int) -> np.ndarray:
        """The training-row indices of global batch ``step``: distinct, fixed by (seed, step)."""
        rng = np.random.default_rng([self.params.seed, step])
        return rng.choice(len(self.split.y_train), size=self.params.batch_size, replace=False)

    def batch(self, step: int, *, rank: int, world_size: int) -> DigitsBatch:
        """Rank ``rank``'s slice: rows ``[rank*B/W, (rank+1)*B/W)`` of global batch ``step``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if self.params.batch_size % world_size:
            raise ValueError(
                f"digits batch_size {self.params.batch_size} is not divisible by "
                f"{world_size} workers"
            )
        per_rank = self.params.batch_size // world_size  # 32 rows / 2 workers = 16 each
        rows = self.global_batch_rows(step)[rank * per_rank : (rank + 1) * per_rank]
        return DigitsBatch(
            pixels=torch.from_numpy(self.split.x_train[rows]),
            labels=torch.from_numpy(self.split.y_train[rows]),
        )

    def loss(self, model: nn.Module, batch: DigitsBatch) -> torch.Tensor:
        return F.cross_entropy(model(batch.pixels), batch.labels)  # mean over the slice

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(torch.from_numpy(self.split.x_val))
                labels = torch.from_numpy(self.split.y_val)
                val_loss = F.cross_entropy(logits, labels).item()
                accuracy = (logits.argmax(dim=-1) == labels).float().mean().item()
        finally:
            model.train(was_training)
        return {"val_accuracy": accuracy, "val_loss": val_loss}
