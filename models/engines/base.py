"""The engine interface: what every task's engine offers to the servers above it.

An engine runs one batch on one device. It does no I/O beyond loading its own weights,
knows nothing of HTTP, Ray or queues, and is driven by one thread at a time.

    engine = EmbeddingEngine(model_dir, device="auto")
    engine.load(); engine.warmup()
    result = engine.run(["a sentence", "another"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    task: str
    """The task this engine serves: ``embed``, ``generate`` or ``classify``."""

    def load(self) -> None:
        """Load weights onto the device. Called once, before anything else."""

    def warmup(self) -> None:
        """Run a representative batch so the first real request pays no one-off costs."""

    def run(self, batch: Sequence[Any]) -> Any:
        """Run one batch; returns the batch's results in input order."""
