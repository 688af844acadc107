"""What a job for the ``digits`` trainer may ask: small classifiers on scikit-learn's bundled
handwritten digits, one member per architecture of a sweep.

Plain pydantic, no torch or sklearn: the gateway reads specs with this alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from training.spec_fields import JobSpec, StrictModel

DigitsArch = Literal["mlp", "cnn"]

MAX_SWEEP_MEMBERS = 64
"""Most members one sweep may train: each is a queue item, a trained model and a registered
version, so the list's length scales a job's cost without any other bound."""
MAX_BATCH_SIZE = 4096


class DigitsHyperparameters(StrictModel):
    arch: DigitsArch | list[DigitsArch] = Field(
        "mlp",
        description="One architecture, or a sweep list: one member trained per entry, at most "
        f"{MAX_SWEEP_MEMBERS}.",
    )
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    epochs: int = Field(20, ge=1, le=1000, description="Passes over the training split.")
    batch_size: int = Field(
        64, ge=1, le=MAX_BATCH_SIZE, description="Samples per optimiser step (at most 4096)."
    )
    hidden: int = Field(64, ge=4, le=4096, description="Width of each member's hidden layers.")
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seeds the train/validation split and the weights (0 to 2**32 - 1).",
    )

    @field_validator("arch", mode="before")
    @classmethod
    def _sweep_bounded(cls, value: object) -> object:
        # before the union is tried: one error naming the field, not one per branch, and a
        # list of 140,000 entries is refused before any of them is read
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("a sweep lists at least one architecture")
            if len(value) > MAX_SWEEP_MEMBERS:
                raise ValueError(
                    f"a sweep has at most {MAX_SWEEP_MEMBERS} members, got {len(value)}"
                )
        return value

    def members(self) -> list[DigitsArch]:
        """The architectures to train, one member each: ``"mlp"`` -> ``["mlp"]``."""
        return [self.arch] if isinstance(self.arch, str) else list(self.arch)


class DigitsEval(StrictModel):
    min_accuracy: float | None = Field(
        None, gt=0, le=1, description="Validation accuracy (0..1) below this fails a member."
    )


class DigitsJobSpec(JobSpec):
    """A job for the ``digits`` trainer."""

    trainer: Literal["digits"] = Field(description="The registered trainer to run.")
    dataset: Literal["sklearn-digits"] = Field(
        "sklearn-digits", description="scikit-learn's bundled 8x8 handwritten digits."
    )
    hyperparameters: DigitsHyperparameters = Field(
        default_factory=DigitsHyperparameters, description="The digits trainer's hyperparameters."
    )
    eval: DigitsEval = Field(
        default_factory=DigitsEval, description="Thresholds each member must meet."
    )
