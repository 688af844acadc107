"""The coordinated batch on real Ray actors: DDP equivalence, and a program error that is not
retried. A lost worker and a stop are tested at the job level (tests/integration/
test_training_jobs.py: a killed train worker, a cancel), and a resume's equality with an
uninterrupted run in-process (tests/unit/training/test_coordinated_unit.py).

Each group is W fresh worker processes (measured on 2 cores: ~3 s until the actors answer,
~3-5 s more importing torch and sklearn and joining the group), so the program is small: a
32-wide MLP, global batch 32, 24 steps, a checkpoint every 4.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from safetensors.torch import load_file

from training.coordinated import (
    CoordinatedResult,
    CoordinatedTrainingFailed,
    run_coordinated,
    run_rank,
)
from training.program import ProgramSpec

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
