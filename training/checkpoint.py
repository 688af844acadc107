"""Training checkpoints: a folder per saved step, written whole or not at all.

    save_checkpoint(ckpt_dir, step=40, model=model, optimizer=opt, extra={"recent_losses": []})
    found = latest_checkpoint(ckpt_dir)      # Path(".../step-00000040") or None
    state = load_checkpoint(found, model=model, optimizer=opt)   # state.step == 40

Layout of ``checkpoint_dir``::

    step-00000035/  model.safetensors  optimizer.pt  meta.json
    step-00000040/  ...
    final.safetensors                  # the trained weights, written at the end of a run

Each step folder is built under a temporary name beside it and renamed into place
(``atomic_path``), so a process killed mid-write leaves the previous checkpoint as the newest
complete one; only the last ``KEEP_CHECKPOINTS`` are kept. Weights are safetensors; the
optimizer's state is ``torch.save``'d and read back with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers (no code runs on load).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.workspace import atomic_path

KEEP_CHECKPOINTS = 2
"""Step folders kept; older ones are deleted after each save (the newest is the one resumed)."""

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "meta.json"
FINAL_WEIGHTS_FILE = "final.safetensors"

_STEP_DIR = re.compile(r"step-(\d{8})")  # fullmatch


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    """Optimiser steps completed when it was saved: training goes on at step ``step``."""
    extra: dict[str, Any]
    """What the saver put in ``extra`` (plain JSON)."""


def _state_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors that share no storage; detached copies on the CPU
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    checkpoint_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``step-<step>`` under ``checkpoint_dir`` atomically; prune to the newest few.

    ``model`` is the plain module (not a DDP wrapper, whose keys carry a ``module.`` prefix).
    Returns the new folder."""
    target = Path(checkpoint_dir) / f"step-{step:08d}"
    with atomic_path(target) as temp:
        temp.mkdir()
        save_file(_state_for_safetensors(model), str(temp / MODEL_FILE))
        torch.save(optimizer.state_dict(), temp / OPTIMIZER_FILE)
        meta = {"step": step, "extra": dict(extra or {})}
        (temp / META_FILE).write_text(json.dumps(meta))
    for old in checkpoint_steps(Path(checkpoint_dir))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_steps(checkpoint_dir: Path) -> list[Path]:
    """The complete step folders, oldest first; temporary (half-written) folders are skipped."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [
        path
        for path in Path(checkpoint_dir).iterdir()
        if _STEP_DIR.fullmatch(path.name) and (path / META_FILE).is_file()
    ]
    return sorted(found, key=lambda path: path.name)  # zero-padded: name order = step order


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None before the first save."""
    steps = checkpoint_steps(checkpoint_dir)
    return steps[-1] if steps else None


def load_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, device: str = "cpu"
) -> LoadedCheckpoint:
    """Restore ``model`` and ``optimizer`` in place from ``folder``; the step and extras."""
    meta = json.loads((folder / META_FILE).read_text())
    model.load_state_dict(load_file(str(folder / MODEL_FILE), device=device))
    optimizer.load_state_dict(
        torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True)
    )
    return LoadedCheckpoint(step=int(meta["step"]), extra=dict(meta.get("extra", {})))


def save_final_weights(checkpoint_dir: Path, model: nn.Module) -> Path:
    """Write the trained weights as ``final.safetensors`` (atomically); its path."""
    target = Path(checkpoint_dir) / FINAL_WEIGHTS_FILE
    with atomic_path(target) as temp:
        save_file(_state_for_safetensors(model), str(temp))
    return target
