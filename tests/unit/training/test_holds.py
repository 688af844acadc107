"""Debug holds: a train rank stops after a requested step, reports it, and is released or
lets go by itself; run in this process (threads for the rank and the test)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from training.checkpoint import latest_checkpoint
from training.coordinated import run_rank
from training.holds import StepHolds
from training.program import ProgramSpec


def test_a_step_nobody_requested_passes_without_a_file(tmp_path: Path) -> None:
    holds = StepHolds(folder=tmp_path / "holds")
    holds.hold_after(3)  # returns at once: if it held, this test would never end
    assert not holds.is_held(3)
    assert not (tmp_path / "holds").exists()


def test_a_requested_step_is_held_until_released_and_taken_only_once(tmp_path: Path) -> None:
    holds = StepHolds(folder=tmp_path / "holds", poll_interval_s=0.01)
    holds.request(3)
    done = threading.Event()

    def rank_0() -> None:
        holds.hold_after(3)
        done.set()

    rank = threading.Thread(target=rank_0, daemon=True)
    rank.start()
    while not holds.is_held(3):  # the rank's own report; the thread ends the wait or hangs
        assert rank.is_alive()
        time.sleep(0.01)
    assert not done.is_set()
    holds.release(3)
    rank.join(timeout=30)
    assert done.is_set()
    holds.hold_after(3)  # the request was taken: a group restarted later passes step 3
    assert sorted(p.name for p in (tmp_path / "holds").iterdir()) == []


def test_a_hold_nobody_releases_ends_by_itself_and_says_it_expired(tmp_path: Path) -> None:
    holds = StepHolds(folder=tmp_path / "holds", max_hold_s=0.0)
    holds.request(5)
    holds.hold_after(5)  # bounded: returns though nothing released it
    assert not holds.is_held(5)
    assert sorted(p.name for p in (tmp_path / "holds").iterdir()) == ["step-5.expired"]


def test_rank_0_is_held_after_the_step_its_checkpoint_and_its_progress_report(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    ckpt = tmp_path / "checkpoints"
    holds = StepHolds(folder=tmp_path / "holds", poll_interval_s=0.01)
    holds.request(4)
    seen: list[int] = []
    params = {"arch": "mlp", "hidden": 16, "batch_size": 32, "max_steps": 6, "seed": 0}
    result: dict[str, float] = {}

    def rank_0() -> None:
        result.update(
            run_rank(
                ProgramSpec(kind="digits", params=params),
                rank=0,
                world_size=1,
                init_method=f"tcp://127.0.0.1:{free_port()}",
                checkpoint_dir=str(ckpt),
                checkpoint_every_steps=4,
                progress=lambda done, total, loss: seen.append(done),
                hold=holds,
            )
        )

    rank = threading.Thread(target=rank_0, daemon=True)
    rank.start()
    while not holds.is_held(4):
        assert rank.is_alive()
        time.sleep(0.01)
    # held after step 4: its checkpoint is on disk and reported, step 5 has not begun
    assert seen == [1, 2, 3, 4]
    newest = latest_checkpoint(ckpt)
    assert newest is not None
    assert newest.name == "step-00000004"
    holds.release(4)
    rank.join(timeout=120)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert result["steps"] == 6
