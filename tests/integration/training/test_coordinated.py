"""The coordinated batch on real Ray actors: DDP equivalence, a lost worker, stop, errors.

Each group is W fresh worker processes (measured on 2 cores: ~3 s until the actors answer,
~3-5 s more importing torch and sklearn and joining the group), so the program is small: a
32-wide MLP, global batch 32, 24 steps, a checkpoint every 4. The file runs in ~50 s.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from safetensors.torch import load_file

from training.checkpoint import latest_checkpoint
from training.coordinated import (
    CoordinatedResult,
    CoordinatedTrainingFailed,
    run_coordinated,
    run_rank,
)
from training.program import ProgramSpec, TrainingStopped

pytestmark = pytest.mark.usefixtures("ray_session")

STEPS = 24
EVERY = 4


def _spec(**overrides: Any) -> ProgramSpec:
    params = {
        "arch": "mlp",
        "hidden": 32,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "max_steps": STEPS,
        "seed": 0,
    }
    return ProgramSpec(kind="digits", params={**params, **overrides})


def _slow_progress(seconds_per_step: float) -> Any:
    # runs in rank 0's process (pickled by value: a closure); rank 1 waits for it at the next
    # all-reduce, so the whole group slows to ~seconds_per_step a step and a test can act
    def progress(done: int, total: int, loss: float) -> None:
        time.sleep(seconds_per_step)

    return progress


def _max_abs_diff(a: Path, b: Path) -> float:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


class _Groups:
    """Records each group's actors and their process ids, to check none outlives the run."""

    def __init__(self) -> None:
        self.actors: list[list[Any]] = []
        self.pids: list[int] = []

    def __call__(self, actors: list[Any]) -> None:
        self.actors.append(actors)
        self.pids += ray.get([actor.pid.remote() for actor in actors])

    def assert_all_gone(self, within_s: float = 15.0) -> None:
        deadline = time.monotonic() + within_s
        alive = list(self.pids)
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if psutil.pid_exists(pid)]
            time.sleep(0.1)
        assert alive == [], f"worker processes still alive: {alive}"


@dataclass(frozen=True)
class _Reference:
    one_rank: dict[str, float]
    one_rank_weights: Path
    two_ranks: CoordinatedResult


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, free_port: Any) -> _Reference:
    """The program run to the end by one rank and by a group of two: what the tests compare.

    One rank runs here in the test process (``run_rank``, what a one-actor group would run,
    without the ~8 s of starting a worker process); two ranks run as Ray actors."""
    one_dir = tmp_path_factory.mktemp("w1")
    one_rank = run_rank(
        _spec(),
        rank=0,
        world_size=1,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        checkpoint_dir=str(one_dir),
        checkpoint_every_steps=EVERY,
    )
    groups = _Groups()
    two_ranks = run_coordinated(
        _spec(),
        world_size=2,
        checkpoint_dir=str(tmp_path_factory.mktemp("w2")),
        checkpoint_every_steps=EVERY,
        poll_interval_s=0.1,
        on_group_started=groups,
    )
    groups.assert_all_gone()
    return _Reference(
        one_rank=one_rank, one_rank_weights=one_dir / "final.safetensors", two_ranks=two_ranks
    )


def test_two_workers_end_with_the_weights_of_one(uninterrupted: _Reference) -> None:
    one, two = uninterrupted.one_rank, uninterrupted.two_ranks
    assert two.restarts == 0
    # measured: max |w1 - w2| = 4.5e-8 over all weights after 24 Adam steps (the all-reduce
    # sums 16-row gradients in another order than one 32-row backward does; float32 noise)
    diff = _max_abs_diff(uninterrupted.one_rank_weights, two.final_weights)
    print(f"\nW=1 vs W=2: max abs weight diff {diff:.3g}")
    assert diff <= 1e-5
    # the reduced loss is the global batch's on both (16-row halves averaged = 32-row mean)
    assert two.metrics["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    assert two.metrics["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=0.01)
    assert two.metrics["steps"] == STEPS


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(
    uninterrupted: _Reference, tmp_path: Path
) -> None:
    ckpt = tmp_path / "checkpoints"
    groups = _Groups()
    killer: list[threading.Thread] = []
    logged: list[str] = []

    def kill_rank_1_after_the_first_checkpoint(actors: list[Any]) -> None:
        groups(actors)
        if len(groups.actors) > 1:
            return  # only the first group is attacked

        def kill() -> None:
            deadline = time.monotonic() + 60
            while latest_checkpoint(ckpt) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            ray.kill(actors[1], no_restart=True)

        killer.append(threading.Thread(target=kill, daemon=True))
        killer[0].start()

    started = time.monotonic()
    result = run_coordinated(
        _spec(),
        world_size=2,
        checkpoint_dir=str(ckpt),
        checkpoint_every_steps=EVERY,
        progress=_slow_progress(0.1),  # 20 steps x 0.1 s = 2 s left after the first save
        log=logged.append,
        poll_interval_s=0.1,
        on_group_started=kill_rank_1_after_the_first_checkpoint,
    )
    elapsed_s = time.monotonic() - started
    killer[0].join(timeout=5)
    groups.assert_all_gone()

    assert result.restarts == 1
    assert len(groups.actors) == 2
    assert result.metrics["resumed_from_step"] > 0  # 4 or 8: the kill lands after a save
    assert result.metrics["resumed_from_step"] % EVERY == 0
    assert len(logged) == 1
    assert logged[0].startswith("rank 1 lost: ActorDiedError"), logged
    # the same batches by step and Adam's moments restored: the interrupted run ends where
    # the uninterrupted one did (measured: identical, max diff 0.0)
    diff = _max_abs_diff(result.final_weights, uninterrupted.two_ranks.final_weights)
    print(f"\nkilled vs uninterrupted: max abs weight diff {diff:.3g}")
    assert diff <= 1e-5
    print(f"\nlost-worker run: {elapsed_s:.1f} s, resumed at {result.metrics['resumed_from_step']}")


def test_should_stop_kills_the_group_and_raises_training_stopped(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    groups = _Groups()
    with pytest.raises(TrainingStopped):
        run_coordinated(
            _spec(),
            world_size=2,
            checkpoint_dir=str(ckpt),
            checkpoint_every_steps=EVERY,
            progress=_slow_progress(0.2),  # 24 x 0.2 s = 4.8 s, far longer than the stop
            should_stop=lambda: latest_checkpoint(ckpt) is not None,
            poll_interval_s=0.05,
            on_group_started=groups,
        )
    assert len(groups.actors) == 1
    assert not (ckpt / "final.safetensors").exists()  # stopped before the end
    groups.assert_all_gone()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(groups.actors[0][0].pid.remote(), timeout=10)


def test_a_program_error_fails_at_once_without_restarts(tmp_path: Path) -> None:
    groups = _Groups()
    logged: list[str] = []
    with pytest.raises(CoordinatedTrainingFailed, match="not divisible by 2 workers") as failed:
        run_coordinated(
            _spec(batch_size=33),  # 33 rows cannot split evenly over 2 ranks: ValueError
            world_size=2,
            checkpoint_dir=str(tmp_path),
            checkpoint_every_steps=EVERY,
            log=logged.append,
            poll_interval_s=0.1,
            on_group_started=groups,
        )
    assert failed.value.restarts == 0
    assert len(groups.actors) == 1  # one group only: a fresh one would fail the same way
    assert logged == []
    groups.assert_all_gone()
