"""Names and paths: every id and name is matched whole (``fullmatch``: ``match`` with ``$``
let ``"name\\n"`` through), and a dataset's files are resolved one by one, so a symlink inside
an allowed folder cannot lead the job out of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.errors import InvalidModelRef
from models.refs import validate_name
from training.api import JobsService, build_jobs_router, job_id_from_path, submit_names
from training.checkpoint import checkpoint_steps
from training.db import create_db_engine, create_tables
from training.jobs import JobNotFound, JobStore
from training.spec import ClusterCapacity, JobSpecInvalid, parse_job_spec, validate_job_spec
from training.trainers.lm import corpus_files
from training.workspace import JobWorkspace

CAPACITY = ClusterCapacity(total_cpus=4, total_gpus=0)


def body_job_id(value: str) -> None:
    submit_names({"job_id": value}, _NoHeaders())  # type: ignore[arg-type]


class _NoHeaders:
    headers: dict[str, str] = {}


def spec_name(value: str) -> None:
    parse_job_spec({"trainer": "lm", "name": value})


Refusal = type[Exception] | tuple[type[Exception], ...]
CHECKS: dict[str, tuple[Callable[[str], object], Refusal]] = {
    "job id in a body": (body_job_id, Exception),
    "job id in a path": (job_id_from_path, JobNotFound),
    "job workspace": (lambda v: JobWorkspace(Path("/jobs"), v), ValueError),
    "job spec name": (spec_name, JobSpecInvalid),
    "model name": (lambda v: validate_name("name", v), InvalidModelRef),
    "model version": (lambda v: validate_name("version", v), InvalidModelRef),
    "model alias": (lambda v: validate_name("alias", v), InvalidModelRef),
}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("tiny-lm.v1_2", True),
        ("tiny-lm\n", False),  # what "$" with match let through
        ("tiny-lm\r\n", False),
        ("tiny\nlm", False),
        ("\ntiny-lm", False),
        ("tiny-lm ", False),
        ("a" * 64, True),
        ("a" * 65, False),
    ],
)
def test_every_id_and_name_is_matched_whole(check: str, value: str, accepted: bool) -> None:
    validate, refusal = CHECKS[check]
    if accepted:
        validate(value)
    else:
        with pytest.raises(refusal):
            validate(value)


@pytest.mark.parametrize(("name", "kept"), [("step-00000010", True), ("step-00000010\n", False)])
def test_a_checkpoint_folder_is_matched_whole(tmp_path: Path, name: str, kept: bool) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "meta.json").write_text("{}")
    assert [p.name for p in checkpoint_steps(tmp_path)] == ([name] if kept else [])


def test_the_jobs_api_refuses_a_job_id_with_a_trailing_newline(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}")
    create_tables(engine)
    service = JobsService(store=JobStore(engine), capacity=lambda: CAPACITY, dataset_roots=())
    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=lambda request: None))
    with TestClient(app) as http:
        refused = http.post("/v1/jobs", json={"trainer": "lm", "name": "x", "job_id": "job-1\n"})
        assert refused.status_code == 422
        assert refused.json()["error"]["fields"][0]["field"] == "job_id"
        created = http.post("/v1/jobs", json={"trainer": "lm", "name": "x", "job_id": "job-1"})
        assert created.status_code == 201
        assert http.get("/v1/jobs/job-1").status_code == 200
        assert http.get("/v1/jobs/job-1%0A").status_code == 404  # not the same job


# --- dataset files --------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(the allowed root with a corpus folder, a folder outside it with a secret)."""
    corpus = tmp_path / "datasets" / "corpus"
    (corpus / "part").mkdir(parents=True)
    (corpus / "a.txt").write_text("hello")
    (corpus / "part" / "b.jsonl").write_text('{"text": "world"}\n')
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    return tmp_path / "datasets", outside


def lm_spec(dataset: Path) -> dict[str, object]:
    return {"trainer": "lm", "name": "tiny-lm", "dataset": str(dataset)}


def test_a_folder_whose_files_stay_inside_is_accepted(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    corpus = root / "corpus"
    os.symlink(corpus / "a.txt", corpus / "again.txt")  # a link that stays inside is fine
    validate_job_spec(lm_spec(corpus), capacity=CAPACITY, allowed_dataset_roots=[root])
    names = [p.name for p in corpus_files(str(corpus), max_bytes=1000)]
    assert names == ["a.txt", "again.txt", "b.jsonl"]


@pytest.mark.parametrize("where", ["a link.txt", "part/deeper.jsonl"])
def test_a_file_symlink_leading_out_of_the_folder_is_refused_naming_dataset(
    roots: tuple[Path, Path], where: str
) -> None:
    root, outside = roots
    corpus = root / "corpus"
    link = corpus / where
    os.symlink(outside / "secret.txt", link)
    with pytest.raises(JobSpecInvalid) as refused:
        validate_job_spec(lm_spec(corpus), capacity=CAPACITY, allowed_dataset_roots=[root])
    [error] = refused.value.errors
    assert error.field == "dataset"
    assert str(outside / "secret.txt") in error.message
    assert "outside the dataset folder" in error.message
    # the read refuses it too: a link made after the job was admitted leads nowhere either
    with pytest.raises(ValueError, match="outside the dataset"):
        corpus_files(str(corpus), max_bytes=1000)


def test_a_linked_folder_is_not_walked_into(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    corpus = root / "corpus"
    os.symlink(outside, corpus / "elsewhere")
    validate_job_spec(lm_spec(corpus), capacity=CAPACITY, allowed_dataset_roots=[root])
    names = [p.name for p in corpus_files(str(corpus), max_bytes=1000)]
    assert names == ["a.txt", "b.jsonl"]  # secret.txt is not among them


def test_the_jobs_api_answers_422_naming_dataset_for_an_escaping_link(
    roots: tuple[Path, Path], tmp_path: Path
) -> None:
    root, outside = roots
    os.symlink(outside / "secret.txt", root / "corpus" / "leak.txt")
    engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}")
    create_tables(engine)
    service = JobsService(store=JobStore(engine), capacity=lambda: CAPACITY, dataset_roots=(root,))
    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=lambda request: None))
    with TestClient(app) as http:
        answer = http.post("/v1/jobs", json=lm_spec(root / "corpus"))
        assert answer.status_code == 422
        assert [f["field"] for f in answer.json()["error"]["fields"]] == ["dataset"]
        assert http.get("/v1/jobs").json()["data"] == []
