"""The JobSpec: bad input is refused before anything is queued, and each error names its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from training.spec import (
    ClusterCapacity,
    DigitsJobSpec,
    FieldError,
    JobSpecInvalid,
    LmJobSpec,
    load_job_spec_yaml,
    validate_job_spec,
)

CAPACITY = ClusterCapacity(total_cpus=8, total_gpus=1)


def lm_raw(**overrides: Any) -> dict[str, Any]:
    return {"name": "tiny-lm", "trainer": "lm", "dataset": "stdlib", **overrides}


def refusal(raw: Any, roots: list[Path] | None = None) -> list[FieldError]:
    with pytest.raises(JobSpecInvalid) as caught:
        validate_job_spec(raw, capacity=CAPACITY, allowed_dataset_roots=roots or [])
    return caught.value.errors


def test_a_minimal_lm_spec_takes_the_trainers_defaults() -> None:
    spec = validate_job_spec(lm_raw(), capacity=CAPACITY, allowed_dataset_roots=[])
    assert isinstance(spec, LmJobSpec)
    assert (spec.hyperparameters.preset, spec.workers, spec.resources.cpu) == ("tiny", 1, 1.0)


def test_a_digits_sweep_lists_one_member_per_architecture() -> None:
    raw = {"name": "d", "trainer": "digits", "hyperparameters": {"arch": ["mlp", "cnn"]}}
    spec = validate_job_spec(raw, capacity=CAPACITY, allowed_dataset_roots=[])
    assert isinstance(spec, DigitsJobSpec)
    assert spec.hyperparameters.members() == ["mlp", "cnn"]
    assert spec.dataset == "sklearn-digits"


def test_negative_learning_rate_is_refused_on_the_hyperparameter_field() -> None:
    errors = refusal(lm_raw(hyperparameters={"learning_rate": -0.1}))
    assert [e.field for e in errors] == ["hyperparameters.learning_rate"]
    assert "greater than 0" in errors[0].message


@pytest.mark.parametrize(
    ("field", "value"),
    [("learning_rate", True), ("max_steps", False), ("max_steps", "30"), ("max_steps", 30.0)],
)
def test_a_number_field_takes_only_a_json_number_of_its_kind(field: str, value: object) -> None:
    # the spec's schema says number/integer: a boolean (Python's bool is an int) or a numeric
    # string must not be coerced into a learning rate of 1.0 or a run of one step
    errors = refusal(lm_raw(hyperparameters={field: value}))
    assert [e.field for e in errors] == [f"hyperparameters.{field}"]


def test_an_integer_is_a_valid_float() -> None:
    spec = validate_job_spec(
        lm_raw(hyperparameters={"learning_rate": 1}), capacity=CAPACITY, allowed_dataset_roots=[]
    )
    assert spec.hyperparameters.learning_rate == 1.0


def test_unknown_trainer_is_refused_on_the_trainer_field_naming_the_known_ones() -> None:
    errors = refusal(lm_raw(trainer="shell"))
    assert [e.field for e in errors] == ["trainer"]
    assert "'lm'" in errors[0].message
    assert "'digits'" in errors[0].message


def test_a_hyperparameter_of_another_trainer_is_refused_as_an_extra_field() -> None:
    errors = refusal(lm_raw(hyperparameters={"epochs": 3}))
    assert [e.field for e in errors] == ["hyperparameters.epochs"]


def test_more_workers_than_training_can_place_are_refused_on_each_resource_field() -> None:
    # 4 workers x 4 CPUs = 16 CPUs > 8; 4 x 1 GPU = 4 GPUs > 1: both said
    errors = refusal(lm_raw(workers=4, resources={"cpu": 4, "gpu": 1}))
    assert [e.field for e in errors] == ["resources.cpu", "resources.gpu"]
    assert "= 16 CPUs, more than the 8 set aside for training (training.cpus)" in errors[0].message
    assert "= 4 GPUs, more than the 1 set aside for training (training.gpus)" in errors[1].message


def test_workers_that_exactly_fill_the_cluster_are_accepted() -> None:
    # 2 workers x 4 CPUs = 8 CPUs = the cluster's 8
    spec = validate_job_spec(
        lm_raw(workers=2, resources={"cpu": 4}), capacity=CAPACITY, allowed_dataset_roots=[]
    )
    assert spec.workers == 2


def test_zero_workers_are_refused() -> None:
    assert [e.field for e in refusal(lm_raw(workers=0))] == ["workers"]


def test_dataset_outside_the_allowed_roots_is_refused_even_through_dot_dot(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "corpus").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    errors = refusal(lm_raw(dataset=str(root / ".." / "secret")), roots=[root])
    assert [e.field for e in errors] == ["dataset"]
    assert "outside the allowed dataset roots" in errors[0].message


def test_dataset_under_an_allowed_root_is_accepted(tmp_path: Path) -> None:
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    spec = validate_job_spec(
        lm_raw(dataset=str(corpus)), capacity=CAPACITY, allowed_dataset_roots=[tmp_path / "data"]
    )
    assert spec.dataset == str(corpus)


def test_a_relative_dataset_path_is_refused(tmp_path: Path) -> None:
    errors = refusal(lm_raw(dataset="data/corpus"), roots=[tmp_path])
    assert errors == [FieldError("dataset", "must be 'stdlib' or an absolute path")]


def test_webhook_with_a_non_http_scheme_is_refused_on_webhook_url() -> None:
    errors = refusal(lm_raw(webhook_url="file:///etc/passwd"))
    assert [e.field for e in errors] == ["webhook_url"]
    assert "http" in errors[0].message


def test_every_shape_error_comes_back_together() -> None:
    errors = refusal(lm_raw(priority=-1, max_retries=99, surprise=True))
    assert sorted(e.field for e in errors) == ["max_retries", "priority", "surprise"]


def test_yaml_is_read_with_safe_load_so_python_tags_are_refused() -> None:
    with pytest.raises(JobSpecInvalid, match="not valid YAML"):
        load_job_spec_yaml("name: !!python/object/apply:os.system ['true']\n")


def test_a_yaml_spec_validates_like_json() -> None:
    raw = load_job_spec_yaml(
        "name: nightly\ntrainer: lm\nhyperparameters:\n  preset: small\n  learning_rate: 0.001\n"
    )
    spec = validate_job_spec(raw, capacity=CAPACITY, allowed_dataset_roots=[])
    assert isinstance(spec, LmJobSpec)
    assert spec.hyperparameters.preset == "small"


def test_a_yaml_document_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(JobSpecInvalid, match="mapping"):
        load_job_spec_yaml("- just\n- a list\n")


def test_a_global_batch_that_workers_cannot_share_evenly_is_refused() -> None:
    # 16 sequences over 3 workers: 5.33 each -> refused; over 4: 4 each -> fine
    errors = refusal(lm_raw(workers=3, hyperparameters={"batch_size": 16}))
    assert [e.field for e in errors] == ["hyperparameters.batch_size"]
    assert "3 workers" in errors[0].message
