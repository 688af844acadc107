"""The pipelines' own decisions, with plain values: the filters, the join, member names, and
registration that a re-run cannot repeat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from model_folders import make_digits_folder

from models.store import ModelStore
from training.pipelines import digits, lm
from training.registration import job_source, promote, register_once
from training.spec import parse_job_spec
from training.stages import StageContext, StageRejected
from training.trainers.registry import TRAINERS
from training.workspace import JobWorkspace


def context(tmp_path: Path, raw: dict[str, Any], outputs: dict[str, Any], **services: Any):
    return StageContext(
        job_id="job-1",
        spec=parse_job_spec({"name": "m", **raw}),
        workspace=JobWorkspace(tmp_path, "job-1"),
        outputs=outputs,
        services=services,
        log=lambda message: None,
    )


def test_lm_evaluate_fails_a_perplexity_above_the_threshold_with_the_reason(tmp_path) -> None:
    raw = {"trainer": "lm", "eval": {"max_perplexity": 20}}
    high = {"train": {"metrics": {"perplexity": 31.5, "val_loss": 3.45}}}
    with pytest.raises(StageRejected, match="perplexity 31.50 is above the threshold 20"):
        lm.evaluate(context(tmp_path, raw, high))
    low = {"train": {"metrics": {"perplexity": 12.0, "val_loss": 2.48}}}
    assert lm.evaluate(context(tmp_path, raw, low)) == {"perplexity": 12.0, "val_loss": 2.48}


def members(*pairs: tuple[str, float]) -> dict[str, Any]:
    return {"train_members": {"members": [{"member": n, "val_accuracy": a} for n, a in pairs]}}


def test_digits_evaluate_drops_members_below_the_threshold(tmp_path) -> None:
    raw = {"trainer": "digits", "eval": {"min_accuracy": 0.95}}
    out = digits.evaluate(context(tmp_path, raw, members(("mlp", 0.953), ("cnn", 0.94))))
    assert out == {"passed": ["mlp"], "rejected": ["cnn"]}


def test_digits_evaluate_with_no_member_left_fails_naming_each_score(tmp_path) -> None:
    raw = {"trainer": "digits", "eval": {"min_accuracy": 0.99}}
    with pytest.raises(StageRejected, match=r"0.99 \(mlp 0.9530, cnn 0.9720\)"):
        digits.evaluate(context(tmp_path, raw, members(("mlp", 0.953), ("cnn", 0.972))))


def test_digits_join_takes_the_best_registered_member(tmp_path) -> None:
    outputs = {
        **members(("mlp", 0.953), ("cnn", 0.972), ("mlp-2", 0.99)),
        "register": {"versions": {"mlp": "1", "cnn": "2"}},  # mlp-2 was filtered out
    }
    joined = digits.join(context(tmp_path, {"trainer": "digits"}, outputs))
    assert (joined["best"], joined["version"], joined["val_accuracy"]) == ("cnn", "2", 0.972)


def test_sweep_members_are_numbered_only_when_an_arch_repeats() -> None:
    assert digits.member_names(["mlp", "cnn"]) == ["mlp", "cnn"]
    assert digits.member_names(["mlp", "cnn", "mlp"]) == ["mlp-1", "cnn", "mlp-2"]


def test_each_trainer_has_its_stages_in_order() -> None:
    assert [s.name for s in TRAINERS.stages("lm")] == [
        "split", "tokenise", "merge", "train", "evaluate", "register", "promote"
    ]  # fmt: skip
    assert [s.role for s in TRAINERS.stages("digits")][:3] == ["splitter", "work queue", "filter"]
    for trainer in ("lm", "digits"):
        assert sum(s.weight for s in TRAINERS.stages(trainer)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no pipeline for trainer 'x'"):
        TRAINERS.stages("x")


def test_registering_again_after_a_crash_finds_the_version_it_made(tmp_path) -> None:
    store = ModelStore(tmp_path / "models")
    folder = make_digits_folder(tmp_path / "member")
    source = job_source("job-1", "mlp")
    first = register_once(store, "digits", folder, task="classify", source=source)
    again = register_once(store, "digits", folder, task="classify", source=source)
    other = register_once(store, "digits", folder, task="classify", source=job_source("job-2"))
    assert (first, again, other) == ("1", "1", "2")
    assert promote(store, "digits", "1") is None
    assert promote(store, "digits", "2") == "1"
    assert store.aliases("digits") == {"serving": "2"}
