"""The digits trainer: split, sweep members, export to serving, and the TrainProgram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.engines.classify import TensorClassifierEngine
from training.program import ProgramSpec, TrainingStopped
from training.spec import DigitsHyperparameters
from training.trainers.digits import (
    DigitsTrainProgram,
    TrainedMember,
    evaluate_accuracy,
    export_digits,
    load_digits_split,
    train_digits_member,
)
from training.trainers.registry import TRAINERS


@pytest.fixture(scope="module")
def trained() -> dict[str, TrainedMember]:
    """Each arch trained once with the spec's defaults (20 epochs, batch 64, lr 1e-3, seed 0);
    about 1 s for the mlp and 5 s for the cnn on this machine's 2 cores."""
    hp = DigitsHyperparameters()
    split = load_digits_split(seed=hp.seed)
    return {arch: train_digits_member(arch, hp, split, seed=hp.seed) for arch in ("mlp", "cnn")}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_each_arch_reaches_95_percent_validation_accuracy_with_the_spec_defaults(
    trained: dict[str, TrainedMember], arch: str
) -> None:
    member = trained[arch]
    # measured (seed 0, torch 2.13 CPU): mlp 343/360 = 0.953, cnn 350/360 = 0.972;
    # seeds 1-4 put the mlp at 0.958-0.969, so 0.95 holds across splits, not only this one
    assert member.metrics["val_accuracy"] >= 0.95
    assert member.metrics["epochs"] == 20
    assert member.metrics["train_loss"] < 0.5  # ln(10) = 2.30 is chance
    split = load_digits_split(seed=0)
    assert evaluate_accuracy(member.model, split.x_val, split.y_val) == pytest.approx(
        member.metrics["val_accuracy"]
    )


def test_the_split_is_stratified_and_repeats_for_a_seed() -> None:
    split = load_digits_split(seed=3, val_fraction=0.2)
    assert (len(split.y_train), len(split.y_val)) == (1437, 360)  # 1797 rows, 20% held out
    assert split.x_train.dtype == np.float32
    assert split.y_train.dtype == np.int64
    assert split.x_train.shape[1] == 64
    train_counts = np.bincount(split.y_train, minlength=10)
    val_counts = np.bincount(split.y_val, minlength=10)
    # stratified: each digit's val share is 20% of its rows, to within one row
    # (digit 0 has 178 rows: 35.6 expected in val, 36 seen)
    assert np.all(np.abs(val_counts - 0.2 * (train_counts + val_counts)) <= 1)

    again = load_digits_split(seed=3, val_fraction=0.2)
    other = load_digits_split(seed=4, val_fraction=0.2)
    np.testing.assert_array_equal(split.x_val, again.x_val)
    np.testing.assert_array_equal(split.y_train, again.y_train)
    assert not np.array_equal(split.x_val, other.x_val)


def test_the_exported_folder_serves_the_same_probabilities_as_the_trained_model(
    trained: dict[str, TrainedMember], tmp_path: Path
) -> None:
    member = trained["cnn"]
    folder = export_digits(member, tmp_path / "members" / "cnn")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["cnn"]  # no temp folder left beside

    engine = TensorClassifierEngine(folder, device="cpu", dtype="float32")
    engine.load()
    rows = load_digits_split(seed=0).x_val[:50]
    served = engine.run(rows)  # (50, 10)
    with torch.no_grad():
        expected = torch.softmax(member.model(torch.from_numpy(rows)), dim=-1).numpy()
    assert served.shape == (50, 10)
    np.testing.assert_allclose(served, expected, atol=1e-6)


def test_should_stop_stops_training_before_the_next_epoch() -> None:
    epochs_done: list[int] = []
    split = load_digits_split(seed=0)
    hp = DigitsHyperparameters(epochs=10)
    with pytest.raises(TrainingStopped, match="before epoch 3"):
        train_digits_member(
            "mlp",
            hp,
            split,
            seed=0,
            should_stop=lambda: len(epochs_done) >= 2,
            on_epoch=lambda epoch, loss: epochs_done.append(epoch),
        )
    assert epochs_done == [1, 2]


def test_the_ranks_slices_of_a_step_make_up_its_global_batch() -> None:
    spec = ProgramSpec(kind="digits", params={"batch_size": 32, "seed": 1})
    program = TRAINERS.build_program(spec)
    assert isinstance(program, DigitsTrainProgram)
    whole = program.batch(5, rank=0, world_size=1)
    halves = [program.batch(5, rank=r, world_size=2) for r in (0, 1)]
    assert whole.pixels.shape == (32, 64)
    assert halves[1].pixels.shape == (16, 64)
    torch.testing.assert_close(torch.cat([h.pixels for h in halves]), whole.pixels)
    torch.testing.assert_close(torch.cat([h.labels for h in halves]), whole.labels)
    # the batch depends on the step: step 6 draws other rows
    assert not torch.equal(program.batch(6, rank=0, world_size=1).labels, whole.labels)


def test_a_batch_that_does_not_divide_among_the_workers_is_refused() -> None:
    program = DigitsTrainProgram.from_params({"batch_size": 32})
    with pytest.raises(ValueError, match="not divisible by 3 workers"):
        program.batch(0, rank=0, world_size=3)


def test_unknown_program_params_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown params \\['epochs'\\]"):
        DigitsTrainProgram.from_params({"epochs": 3})


def test_the_program_trains_its_model_towards_the_validation_labels() -> None:
    program = DigitsTrainProgram.from_params({"batch_size": 64, "max_steps": 100})
    model = program.build_model()
    optimizer = program.build_optimizer(model)
    before = program.evaluate(model)
    for step in range(program.max_steps):
        loss = program.loss(model, program.batch(step, rank=0, world_size=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = program.evaluate(model)
    # 100 steps of 64 rows (~4.5 epochs) at lr 1e-3, measured: val loss 2.30 (chance, ln 10)
    # -> 0.64, accuracy 0.11 -> 0.886
    assert before["val_loss"] > 2.0
    assert after["val_loss"] < 1.0
    assert after["val_accuracy"] > 0.8
