"""What the coordinated train stage runs: a ``TrainProgram``, built in each worker by name.

A trainer describes its training as a program; ``training.coordinated`` runs any program on
W data-parallel workers. The trainer registry builds it from a ``ProgramSpec`` (the trainer's
name and plain params, what travels to each worker). The program never sees ranks or process
groups, only which part of each global batch is its own:

    program = TRAINERS.build_program(ProgramSpec(kind="lm", params={...}))
    model = program.build_model()                       # same seed on every rank
    batch = program.batch(step, rank=0, world_size=2)   # rank 0's half of global batch `step`
    loss = program.loss(model, batch)                   # mean over this rank's samples

The contract that makes W workers equal one: ``batch(step, r, W)`` for r in 0..W-1 are equal
slices of one global batch that depends on ``step`` alone, and ``loss`` is a mean over the
slice; averaging the W gradients (what DDP's all-reduce does) is then the gradient of the
global batch's mean loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types only: the trainer registry imports this module, torch-free
    import torch
    from torch import nn


@dataclass(frozen=True, kw_only=True)
class ProgramSpec:
    """A program by name and plain parameters: what travels to each worker."""

    kind: str
    """A registered trainer's name (``lm``, or a test's own): ``TRAINERS.build_program``
    builds that trainer's program."""
    params: Mapping[str, Any] = field(default_factory=dict)


class TrainProgram(Protocol):
    max_steps: int
    global_batch_size: int

    def build_model(self) -> nn.Module:
        """The initial model, the same on every rank (seeded)."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer: ...

    def learning_rate(self, step: int) -> float:
        """The rate for optimiser step ``step`` (0-based): warm-up and decay live here."""

    def batch(self, step: int, *, rank: int, world_size: int) -> Any:
        """Rank ``rank``'s equal slice of global batch ``step``."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss over ``batch``'s samples (a scalar)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics of the trained model (rank 0 runs it once, at the end)."""


GRAD_CLIP_NORM: float = 1.0
"""Gradients are clipped to this total L2 norm before each optimiser step (every program)."""


class TrainingStopped(Exception):
    """Training was asked to stop (a cancel) and did, before its last step or epoch."""
