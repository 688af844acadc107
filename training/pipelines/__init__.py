"""Each trainer's pipeline: its stages, in order, and the queue handlers its stages use.

stages = pipeline_for("lm")   # [split, tokenise, merge, train, evaluate, register, promote]
"""

from __future__ import annotations

import importlib

from training.stages import Stage


def pipeline_for(trainer: str) -> list[Stage]:
    """The stages of ``trainer``'s pipeline; ``ValueError`` for a trainer with none."""
    if trainer not in ("lm", "digits"):
        raise ValueError(f"no pipeline for trainer {trainer!r}")
    return importlib.import_module(f"training.pipelines.{trainer}").stages()
