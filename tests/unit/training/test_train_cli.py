"""``loom train`` against a real HTTP server: the jobs router under uvicorn on 127.0.0.1, in a
thread, over a job store on SQLite. The test moves jobs through their states by hand."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from loom.cli import main
from training.api import JobsService, build_jobs_router
from training.db import create_db_engine, create_tables
from training.jobs import JobId, JobStore
from training.spec import ClusterCapacity
from training.webhook_addresses import WebhookAddressPolicy, parse_networks

API_KEY = "cli-test-key"


class Unauthorized(Exception):
    pass


@dataclass
class Server:
    url: str
    store: JobStore


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}")
    create_tables(engine)
    store = JobStore(engine)
    service = JobsService(
        store=store,
        capacity=lambda: ClusterCapacity(total_cpus=4, total_gpus=0),
        dataset_roots=(tmp_path,),
        # a webhook may name 127.0.0.1 here (nothing is delivered: there is no deliverer)
        webhook_policy=WebhookAddressPolicy(allowed_networks=parse_networks(["127.0.0.1/32"])),
    )

    def authorize(request: Request) -> None:  # the CLI sends LOOM_API_KEYS' first key
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            raise Unauthorized()

    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=authorize))

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        error = {"message": "invalid API key", "code": "invalid_api_key"}
        return JSONResponse({"error": error}, status_code=401)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.started, "uvicorn did not start"
    monkeypatch.setenv("LOOM_API_KEYS", f"{API_KEY},other")
    try:
        yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", store)
    finally:
        http.should_exit = True
        thread.join(timeout=10)
        sock.close()
        engine.dispose()


def write_spec(tmp_path: Path, text: str = "name: tiny-lm\ntrainer: lm\n") -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def submit(server: Server, tmp_path: Path, *extra: str) -> str:
    assert main(["train", "submit", write_spec(tmp_path), "--url", server.url, *extra]) == 0
    return server.store.list()[-1].id.value


def test_submit_prints_the_new_job_id(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "submit", write_spec(tmp_path), "--url", server.url, "--job-id", "j-1"])
    assert code == 0
    assert capsys.readouterr().out == "j-1\n"
    (job,) = server.store.list()
    assert (job.id.value, job.name, job.state) == ("j-1", "tiny-lm", "queued")


def test_submit_shows_the_webhook_secret_once_on_stderr(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, "name: tiny-lm\ntrainer: lm\nwebhook_url: http://127.0.0.1:9/h\n")
    assert main(["train", "submit", spec, "--url", server.url, "--job-id", "j-w"]) == 0
    out = capsys.readouterr()
    assert out.out == "j-w\n"  # stdout is the id alone, for scripts
    assert "webhook secret (shown once" in out.err
    assert "whsec_" in out.err
    assert main(["train", "submit", spec, "--url", server.url, "--job-id", "j-w"]) == 0
    assert "whsec_" not in capsys.readouterr().err  # a repeat does not show it again


def test_submit_with_the_same_idempotency_key_returns_the_same_job(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = submit(server, tmp_path, "--idempotency-key", "nightly")
    again = submit(server, tmp_path, "--idempotency-key", "nightly")
    assert first == again
    out = capsys.readouterr()
    assert out.out.split() == [first, first]
    assert "an existing job" in out.err


def test_a_refused_spec_prints_each_field_error_on_stderr_and_exits_2(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = "name: tiny-lm\ntrainer: lm\nworkers: 8\nhyperparameters:\n  learning_rate: -1\n"
    code = main(["train", "submit", write_spec(tmp_path, spec), "--url", server.url])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: the server refused the job spec (422 invalid_job_spec):"
    assert err[1].startswith("  hyperparameters.learning_rate: ")
    assert len(err) == 2  # shape errors first; capacity is checked once the shape passes
    assert server.store.list() == []


def test_a_file_that_is_not_yaml_is_refused_before_any_request(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["train", "submit", write_spec(tmp_path, "- just\n- a list\n"), "--url", server.url]
    )
    assert code == 2
    assert "a job spec is a YAML mapping" in capsys.readouterr().err


def test_list_shows_jobs_and_filters_by_state(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = submit(server, tmp_path, "--job-id", "j-1")
    submit(server, tmp_path, "--job-id", "j-2")
    server.store.start(JobId(first), stage="split")
    capsys.readouterr()

    assert main(["train", "list", "--url", server.url]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["ID", "NAME", "TRAINER", "STATE", "STAGE", "PROGRESS"]
    assert [row.split()[:5] for row in rows[1:]] == [
        ["j-1", "tiny-lm", "lm", "running", "split"],
        ["j-2", "tiny-lm", "lm", "queued", "-"],
    ]
    assert main(["train", "list", "--state", "queued", "--json", "--url", server.url]) == 0
    assert [job["id"] for job in json.loads(capsys.readouterr().out)] == ["j-2"]
    assert main(["train", "list", "--state", "paused", "--url", server.url]) == 2


def test_status_shows_the_job_and_404s_an_unknown_one(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = submit(server, tmp_path)
    server.store.start(JobId(job_id), stage="train")
    server.store.fail(JobId(job_id), "loss went to nan")
    capsys.readouterr()

    assert main(["train", "status", job_id, "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert f"id:        {job_id}" in out
    assert "state:     failed in train" in out
    assert "error:     loss went to nan" in out
    assert main(["train", "status", job_id, "--json", "--url", server.url]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "failed"

    assert main(["train", "status", "job-nope", "--url", server.url]) == 1
    assert "job 'job-nope' does not exist (404 job_not_found)" in capsys.readouterr().err


def test_cancel_cancels_then_a_second_cancel_fails(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = submit(server, tmp_path)
    capsys.readouterr()
    assert main(["train", "cancel", job_id, "--url", server.url]) == 0
    assert capsys.readouterr().out == f"job {job_id} cancelled\n"
    assert main(["train", "cancel", job_id, "--url", server.url]) == 1
    assert "409 job_conflict" in capsys.readouterr().err


def test_logs_follow_prints_every_line_until_the_job_ends(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = JobId(submit(server, tmp_path))
    server.store.log(job_id, "split into 8 shards", stage="split")

    def drive() -> None:
        time.sleep(0.2)
        server.store.start(job_id, stage="train")
        server.store.log(job_id, "step 10 loss 2.5", stage="train")
        server.store.succeed(job_id)

    driver = threading.Thread(target=drive)
    driver.start()
    args = ["train", "logs", job_id.value, "--follow", "--poll-interval-s", "0.05"]
    code = main([*args, "--url", server.url])
    driver.join()
    assert code == 0
    lines = capsys.readouterr().out.splitlines()[1:]  # after submit's job id
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[split] split into 8 shards",
        "[train] step 10 loss 2.5",
    ]


def test_submit_follow_ends_with_0_when_the_job_succeeds(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def drive() -> None:
        while not server.store.list():
            time.sleep(0.02)
        job_id = server.store.list()[0].id
        server.store.start(job_id, stage="train")
        server.store.report_progress(job_id, progress=0.5, metrics={"loss": 2.0})
        time.sleep(0.2)
        server.store.succeed(job_id, metrics={"loss": 1.25})

    driver = threading.Thread(target=drive)
    driver.start()
    args = ["train", "submit", write_spec(tmp_path), "--follow", "--poll-interval-s", "0.05"]
    code = main([*args, "--url", server.url])
    driver.join()
    assert code == 0
    job_id = server.store.list()[0].id.value
    out = capsys.readouterr()
    assert out.out == f"{job_id}\n"
    assert f"job {job_id} succeeded: loss=1.25" in out.err


def test_submit_follow_ends_with_1_and_the_error_when_the_job_fails(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def drive() -> None:
        while not server.store.list():
            time.sleep(0.02)
        server.store.fail(server.store.list()[0].id, "no such dataset")

    driver = threading.Thread(target=drive)
    driver.start()
    args = ["train", "submit", write_spec(tmp_path), "--follow", "--poll-interval-s", "0.05"]
    code = main([*args, "--url", server.url])
    driver.join()
    assert code == 1
    assert "failed: no such dataset" in capsys.readouterr().err


def test_a_missing_key_is_reported_and_exits_1(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOOM_API_KEYS")
    assert main(["train", "list", "--url", server.url]) == 1
    assert "invalid API key (401 invalid_api_key)" in capsys.readouterr().err


def test_no_server_is_reported_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a port nobody listens on
    assert main(["train", "list", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert "no Loom server at" in capsys.readouterr().err
