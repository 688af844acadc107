"""``loom serve`` killed as a crash would (SIGKILL to the process group's leader only) and started
again on the same home and port: it comes up and serves, the killed run's Ray processes are
gone, a half-copied registration is removed, and a clean stop leaves no Ray process of either
run. The config serves a model with no version yet (the usual first step of train -> serve):
it does not stop either start, answers 503 naming the alias it waits for, and serves once a
version is registered and the alias set, with no restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from loom_process import REPO, LoomProcess, _wait_ready, start_loom, stop_loom
from model_folders import make_digits_folder

from models.settings import LoomEnv
from models.store import ModelStore
from serving.run_record import RunRecords, session_processes

CONFIG = {
    "models": [
        {"name": "minilm", "source": "minilm", "task": "embed", "replicas": 1},
        {"name": "digits", "source": "digits#serving", "task": "classify",
         "replicas": 1, "num_cpus": 0.5, "torch_threads": 1},
    ],
    "rollout": {"poll_interval_s": 0.2, "drain_timeout_s": 5},
    "training": {"enabled": False},
}  # fmt: skip
WAIT_S = 300.0
"""The longest a wait for what the server reports may take before the test gives up."""


def run_records(home: Path) -> RunRecords:
    return RunRecords(LoomEnv.from_environ({"LOOM_HOME": str(home)}).run_dir)


def ray_session(home: Path, port: int) -> str:
    """The Ray session the server on ``port`` recorded it started."""
    session = json.loads(run_records(home).path(port).read_text())["ray_session_dir"]
    assert isinstance(session, str)
    return session


def start_again(killed: LoomProcess) -> LoomProcess:
    """``loom serve`` again as ``killed`` was started, ready once the new run answers: until it
    has cleaned up, the killed run's gateway replica may still answer on the port, so the
    readiness wait starts only once the run record is the new process's (written after the
    clean-up, when its own Ray is up)."""
    log = killed.home / "serve.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            killed.process.args,
            cwd=REPO,
            env={
                **{k: v for k, v in os.environ.items() if k != "LOOM_API_KEYS"},
                "LOOM_HOME": str(killed.home),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    loom = LoomProcess(killed.url, killed.home, process, log)
    record = run_records(killed.home).path(int(killed.url.rsplit(":", 1)[1]))
    wait_for(
        lambda: (
            process.poll() is not None
            or (record.exists() and json.loads(record.read_text())["pid"] == process.pid)
        ),
        "the new run's record",
        loom,
    )
    return _wait_ready(loom)


def wait_for(check: Callable[[], bool], what: str, loom: LoomProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen:\n{loom.log_tail()}")
        time.sleep(0.5)


def digits_infer(url: str) -> httpx.Response:
    pixels = np.zeros((1, 64), dtype=np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": pixels.ravel().tolist()}]}  # fmt: skip
    return httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)


@pytest.mark.timeout(1200)
def test_a_sigkilled_server_comes_back_on_the_same_home_and_leaves_nothing_behind(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    home, port = tmp_path / "home", free_port()
    first = start_loom(home, port, CONFIG)  # ready although digits has no version
    sessions = [ray_session(home, port)]
    try:
        waiting = digits_infer(first.url)
        assert waiting.status_code == 503, waiting.text
        assert waiting.json() == {
            "error": "model 'digits' has no version ready yet: "
            "alias 'serving' of digits is not set in the model store yet"
        }
        assert httpx.get(f"{first.url}/v2/models/digits/ready", timeout=30).status_code == 503
        assert session_processes(sessions[0])  # Ray runs for it

        first.process.send_signal(signal.SIGKILL)  # the leader only, as a crash would
        assert first.process.wait(timeout=60) == -signal.SIGKILL
        store_dir = LoomEnv.from_environ({"LOOM_HOME": str(home)}).models_dir
        half_copied = store_dir / ".staging" / "digits-killed"  # a registration cut short
        half_copied.mkdir(parents=True)
        (half_copied / "model.safetensors").write_bytes(b"half")

        second = start_again(first)  # the same home and port
    except BaseException:
        stop_loom(first)
        raise
    try:
        sessions.append(ray_session(home, port))
        assert sessions[1] != sessions[0]
        assert session_processes(sessions[0]) == []  # the killed run left nothing running
        assert not half_copied.exists()
        served = httpx.post(
            f"{second.url}/v1/embeddings", json={"model": "minilm", "input": ["back"]}, timeout=60
        )
        assert served.status_code == 200, served.text
        assert len(served.json()["data"][0]["embedding"]) == 384

        # a training job's promote: true does this: the first version, then the alias
        store = ModelStore(store_dir)
        store.register("digits", make_digits_folder(tmp_path / "digits"), task="classify")
        store.set_alias("digits", "serving", "1")
        wait_for(
            lambda: (
                httpx.get(f"{second.url}/v2/models/digits/ready", timeout=30).status_code == 200
            ),
            "digits serving after its alias was set",
            second,
        )
        answer = digits_infer(second.url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "1"
    finally:
        code, leftovers = stop_loom(second)
    assert code == 0, second.log_tail()
    assert not leftovers, "a process of the restarted server's group outlived it"
    # Ray's actor workers leave the server's process group: ask by session instead, giving
    # the ones Ray's shutdown ended the time the group had (stop_loom) to be gone too
    deadline = time.monotonic() + 15
    while any(session_processes(s) for s in sessions) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert [session_processes(s) for s in sessions] == [[], []]
    assert not run_records(home).path(port).exists()  # a clean stop removes its record
    assert "killed without stopping" in second.log_tail(20000)
