"""Every spec field that scales a job's cost has a ceiling: past it the spec is refused with
an error naming the field (the 422 body), before anything is queued."""

from __future__ import annotations

from typing import Any

import pytest

from training.pipelines.digits import member_names
from training.spec import ClusterCapacity, JobSpecInvalid, validate_job_spec
from training.trainers.digits_spec import MAX_SWEEP_MEMBERS
from training.trainers.lm_spec import MAX_STEPS

CAPACITY = ClusterCapacity(total_cpus=8, total_gpus=0)
LM = {"name": "tiny-lm", "trainer": "lm"}
DIGITS = {"name": "digits", "trainer": "digits"}


def refused_fields(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(JobSpecInvalid) as caught:
        validate_job_spec(raw, capacity=CAPACITY, allowed_dataset_roots=())
    return [error.field for error in caught.value.errors]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({**DIGITS, "hyperparameters": {"arch": ["mlp"] * 140_000}}, "hyperparameters.arch"),
        ({**DIGITS, "hyperparameters": {"arch": ["mlp"] * 65}}, "hyperparameters.arch"),
        ({**DIGITS, "hyperparameters": {"arch": []}}, "hyperparameters.arch"),
        ({**DIGITS, "hyperparameters": {"epochs": 1001}}, "hyperparameters.epochs"),
        ({**DIGITS, "hyperparameters": {"batch_size": 4097}}, "hyperparameters.batch_size"),
        ({**DIGITS, "hyperparameters": {"hidden": 4097}}, "hyperparameters.hidden"),
        ({**LM, "hyperparameters": {"max_steps": 100_001}}, "hyperparameters.max_steps"),
        ({**LM, "hyperparameters": {"max_steps": 10**30}}, "hyperparameters.max_steps"),
        ({**LM, "hyperparameters": {"batch_size": 4097}}, "hyperparameters.batch_size"),
        (
            {**LM, "hyperparameters": {"checkpoint_every_steps": 100_001}},
            "hyperparameters.checkpoint_every_steps",
        ),
        ({**LM, "hyperparameters": {"seq_len": 4097}}, "hyperparameters.seq_len"),
        ({**LM, "hyperparameters": {"shards": 4097}}, "hyperparameters.shards"),
        ({**LM, "hyperparameters": {"max_corpus_mb": 100_001}}, "hyperparameters.max_corpus_mb"),
        ({**LM, "workers": 257}, "workers"),
        ({**LM, "stage_workers": 257}, "stage_workers"),
    ],
)
def test_a_value_past_its_ceiling_is_refused_naming_exactly_its_field(
    raw: dict[str, Any], field: str
) -> None:
    assert refused_fields(raw) == [field]


def test_a_sweep_past_the_limit_says_the_limit_and_its_size() -> None:
    raw = {**DIGITS, "hyperparameters": {"arch": ["mlp", "cnn"] * 70_000}}
    with pytest.raises(JobSpecInvalid) as caught:
        validate_job_spec(raw, capacity=CAPACITY, allowed_dataset_roots=())
    (error,) = caught.value.errors
    assert f"at most {MAX_SWEEP_MEMBERS} members, got 140000" in error.message


def test_values_at_each_ceiling_are_accepted() -> None:
    digits = {"arch": ["mlp"] * MAX_SWEEP_MEMBERS, "epochs": 1000, "batch_size": 4096}
    spec = validate_job_spec(
        {**DIGITS, "hyperparameters": digits}, capacity=CAPACITY, allowed_dataset_roots=()
    )
    assert len(spec.hyperparameters.members()) == 64
    lm = {"max_steps": MAX_STEPS, "batch_size": 4096, "checkpoint_every_steps": MAX_STEPS}
    spec = validate_job_spec(
        {**LM, "hyperparameters": lm}, capacity=CAPACITY, allowed_dataset_roots=()
    )
    assert spec.hyperparameters.max_steps == 100_000


class CountingList(list[str]):
    """A list that counts how many of its elements are visited (iterated or counted)."""

    visits = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for item in super().__iter__():
            self.visits += 1
            yield item

    def count(self, value: str) -> int:
        self.visits += len(self)
        return super().count(value)


def test_member_naming_is_linear_in_the_sweep_size() -> None:
    # the old naming counted the list once per member: 140,000 members took minutes. Visits
    # are counted, not time: linear naming looks at each member a fixed number of times
    archs = CountingList(["mlp", "cnn"] * 70_000)
    names = member_names(archs)
    assert (names[0], names[1], names[-1]) == ("mlp-1", "cnn-1", "cnn-70000")
    assert len(set(names)) == 140_000
    assert archs.visits <= 2 * len(archs)
