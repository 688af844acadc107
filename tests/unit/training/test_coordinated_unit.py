"""One rank of the coordinated batch, in this process (W=1, gloo on loopback, no Ray)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import KEEP_CHECKPOINTS, checkpoint_steps, latest_checkpoint
from training.coordinated import run_rank
from training.program import ProgramSpec


def _digits(max_steps: int) -> ProgramSpec:
    params = {"arch": "mlp", "hidden": 16, "batch_size": 32, "max_steps": max_steps, "seed": 0}
    return ProgramSpec(kind="digits", params=params)


def _run(spec: ProgramSpec, ckpt: Path, port: int, **kwargs: object) -> dict[str, float]:
    return run_rank(
        spec,
        rank=0,
        world_size=1,
        init_method=f"tcp://127.0.0.1:{port}",
        checkpoint_dir=str(ckpt),
        checkpoint_every_steps=4,
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_second_run_with_more_steps_resumes_from_the_saved_checkpoint(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    ckpt = tmp_path / "checkpoints"
    seen: list[tuple[int, int]] = []
    first = _run(_digits(10), ckpt, free_port(), progress=lambda d, n, loss: seen.append((d, n)))
    # checkpoints after steps 4, 8 and the last (10); only the newest 2 are kept
    assert [p.name for p in checkpoint_steps(ckpt)] == ["step-00000008", "step-00000010"]
    assert KEEP_CHECKPOINTS == 2
    assert seen == [(d, 10) for d in range(1, 11)]
    assert first["resumed_from_step"] == 0
    assert first["steps"] == 10
    assert 0 < first["train_loss"] < 2.5  # ln(10) = 2.30 at chance, falling
    assert set(first) >= {"val_accuracy", "val_loss"}
    weights_after_10 = load_file(str(ckpt / "final.safetensors"))

    second = _run(_digits(16), ckpt, free_port())
    assert second["resumed_from_step"] == 10  # the saved step, not a fresh start
    assert second["steps"] == 16
    assert latest_checkpoint(ckpt).name == "step-00000016"
    weights_after_16 = load_file(str(ckpt / "final.safetensors"))
    assert not torch.equal(weights_after_10["net.0.weight"], weights_after_16["net.0.weight"])


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    # 6 steps, then 6 more from the checkpoint, against 12 in one go: the batches depend on
    # the step alone and Adam's moments come back from the checkpoint, so the two agree
    _run(_digits(6), tmp_path / "split", free_port())
    resumed = _run(_digits(12), tmp_path / "split", free_port())
    whole = _run(_digits(12), tmp_path / "whole", free_port())
    assert resumed["resumed_from_step"] == 6
    assert whole["resumed_from_step"] == 0
    split_weights = load_file(str(tmp_path / "split" / "final.safetensors"))
    whole_weights = load_file(str(tmp_path / "whole" / "final.safetensors"))
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(split_weights[name], tensor, rtol=0, atol=1e-6)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)


def test_a_half_written_checkpoint_is_not_resumed(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    ckpt = tmp_path / "checkpoints"
    _run(_digits(4), ckpt, free_port())
    # what a rank killed mid-save leaves: a temporary folder beside the complete ones
    (ckpt / ".step-00000008.1a2b3c4d.tmp").mkdir()
    (ckpt / ".step-00000008.1a2b3c4d.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    again = _run(_digits(8), ckpt, free_port())
    assert again["resumed_from_step"] == 4


def test_checkpoint_every_zero_steps_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint_every_steps"):
        run_rank(
            _digits(4),
            rank=0,
            world_size=1,
            init_method="tcp://127.0.0.1:1",
            checkpoint_dir=str(tmp_path),
            checkpoint_every_steps=0,
        )
