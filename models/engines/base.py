"""The engine interface: what every task's engine offers to the servers above it.

An engine runs one batch on one device (or, given ``devices``, on a model split across
several: ``models.parallel``). It does no I/O beyond loading its own weights, knows nothing of
HTTP, Ray or queues, and is driven by one thread at a time.

    engine = EmbeddingEngine(model_dir, device="auto")
    engine.load(); engine.warmup()
    result = engine.run(["a sentence", "another"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from models.device import resolve_device, resolve_dtype
from models.loading import LoadedModel, load_pretrained
from models.parallel import split_across_devices


@runtime_checkable
class Engine(Protocol):
    task: str
    """The task this engine serves: ``embed``, ``generate`` or ``classify``."""

    def load(self) -> None:
        """Load weights onto the device. Called once, before anything else."""

    def warmup(self) -> None:
        """Run a representative batch so the first real request pays no one-off costs."""

    def run(self, batch: Any) -> Any:
        """Run one batch; returns the batch's results in input order. Each engine names its
        own batch and result types (texts, an FP32 array, (prompt, params) pairs), so no one
        type fits them all here."""


class DeviceEngine:
    """What every engine shares: its folder, the device and dtype (resolved when the engine is
    built, so a machine that cannot honour the config fails then, not at the first request),
    and torch's intra-op threads (set on ``load``).

    ``devices`` (e.g. ``["cuda:0", "cuda:1"]``; may repeat) asks for the model's layers split
    across them in pipeline stages; ``device`` is then the first of them, where inputs go.
    """

    task: str

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
        devices: Sequence[str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.devices = _resolve_devices(device, devices)
        self.device = self.devices[0]
        self.dtype = _resolve_one_dtype(dtype, self.devices)
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, not {num_threads}")
        self._num_threads = num_threads

    @property
    def is_split(self) -> bool:
        """True when the model is split across more than one device (pipeline stages)."""
        return len(self.devices) > 1

    def _set_threads(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)


def _resolve_devices(device: str, devices: Sequence[str] | None) -> tuple[torch.device, ...]:
    """``devices`` resolved one by one when given, else ``(device,)``. A ``device`` other than
    ``auto`` next to ``devices`` must name their first: two answers to "where do inputs go"
    is a config error, not something to guess."""
    if devices is None:
        return (resolve_device(device),)
    if isinstance(devices, str) or not devices:
        raise ValueError(f"devices must be a non-empty list of devices, not {devices!r}")
    resolved = tuple(resolve_device(spec) for spec in devices)
    if device.strip().lower() != "auto" and resolve_device(device) != resolved[0]:
        raise ValueError(
            f"device {device!r} and devices {list(devices)} disagree: inputs go to the first "
            f"of devices; leave device as 'auto' or name {devices[0]!r}"
        )
    return resolved


def _resolve_one_dtype(spec: str, devices: Sequence[torch.device]) -> torch.dtype:
    """One dtype for every stage: ``auto`` across a CPU and a GPU would mean two."""
    dtypes = {resolve_dtype(spec, device) for device in devices}
    if len(dtypes) > 1:
        raise ValueError(
            f"dtype {spec!r} means {sorted(map(str, dtypes))} across devices "
            f"{[str(d) for d in devices]}: name one dtype all of them support"
        )
    return dtypes.pop()


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
        devices: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            model_dir, device=device, dtype=dtype, num_threads=num_threads, devices=devices
        )
        self._loaded: LoadedModel | None = None

    def _load_pretrained(self) -> LoadedModel:
        """Set torch's threads, then load the folder's model and tokenizer for ``task``; split
        across ``devices`` when there are several (loaded on the CPU first, so no one device
        ever holds the whole model)."""
        self._set_threads()
        if not self.is_split:
            return load_pretrained(
                self.model_dir, task=self.task, device=self.device, dtype=self.dtype
            )
        loaded = load_pretrained(
            self.model_dir, task=self.task, device=torch.device("cpu"), dtype=self.dtype
        )
        split_across_devices(loaded.model, self.devices)
        return replace(loaded, device=self.device)

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeError(f"{type(self).__name__}.load() must be called first")
        return self._loaded
