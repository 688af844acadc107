"""The engine interface: what every task's engine offers to the servers above it.

An engine runs one batch on one device. It does no I/O beyond loading its own weights,
knows nothing of HTTP, Ray or queues, and is driven by one thread at a time.

    engine = EmbeddingEngine(model_dir, device="auto")
    engine.load(); engine.warmup()
    result = engine.run(["a sentence", "another"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from models.device import resolve_device, resolve_dtype
from models.loading import LoadedModel, load_pretrained


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


class DeviceEngine:
    """What every engine shares: its folder, the device and dtype (resolved when the engine is
    built, so a machine that cannot honour the config fails then, not at the first request),
    and torch's intra-op threads (set on ``load``)."""

    task: str

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, not {num_threads}")
        self._num_threads = num_threads

    def _set_threads(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)


class PretrainedEngine(DeviceEngine):
    """An engine over a transformers folder: ``DeviceEngine`` plus loading (safetensors only).

    class MyEngine(PretrainedEngine):
        task = "embed"
        def load(self): self._loaded = self._load_pretrained()
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        super().__init__(model_dir, device=device, dtype=dtype, num_threads=num_threads)
        self._loaded: LoadedModel | None = None

    def _load_pretrained(self) -> LoadedModel:
        """Set torch's threads, then load the folder's model and tokenizer for ``task``."""
        self._set_threads()
        return load_pretrained(self.model_dir, task=self.task, device=self.device, dtype=self.dtype)

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeError(f"{type(self).__name__}.load() must be called first")
        return self._loaded
