"""The run record: a start cleans up after a run that was killed. Real processes (no Ray)
stand in for a killed run's leftovers: one holding a file of its "Ray session" open, one with
the session on its command line, and one that has nothing to do with it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.run_record import RunRecord, RunRecords, process_start_ticks, session_processes

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

HOLD = "import sys, time; f = open(sys.argv[1], 'a'); print('ready', flush=True); time.sleep(600)"


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; whatever is left of them is ended afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def hold_open(path: Path, spawned: list[subprocess.Popen[str]], *extra: str) -> int:
    """A process with ``path`` open (and ``extra`` on its command line), once it says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), *extra], stdout=subprocess.PIPE, text=True
    )
    spawned.append(process)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process.pid


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def session(tmp_path: Path) -> Path:
    return tmp_path / "ray" / "session_2026-12-05_19-07-17_855832_4242"


def test_a_dead_runs_session_processes_are_ended_and_its_files_removed(
    tmp_path: Path, session: Path, spawned: list[subprocess.Popen[str]]
) -> None:
    agent = hold_open(session / "logs" / "dashboard_agent.log", spawned)
    by_argument = hold_open(tmp_path / "elsewhere.log", spawned, f"--log-dir={session}/logs")
    bystander = hold_open(tmp_path / "ray" / "session_other" / "logs" / "x.log", spawned)
    assert session_processes(str(session)) == sorted([agent, by_argument])

    records = RunRecords(tmp_path / "run")
    metrics = tmp_path / "run" / "metrics-8000"
    metrics.mkdir(parents=True)
    (metrics / "counter_1.db").write_bytes(b"x")
    records.write(
        RunRecord(
            pid=dead_pid(),
            pid_start_ticks=1,
            port=8000,
            ray_session_dir=str(session),
            metrics_dir=str(metrics),
        )
    )

    cleaned = records.clean_dead_runs()

    assert [r.port for r in cleaned] == [8000]
    assert session_processes(str(session)) == []  # what /proc reports: none left
    assert process_start_ticks(bystander) is not None  # another session's process lives on
    assert not records.path(8000).exists()
    assert not metrics.exists()
    assert records.clean_dead_runs() == []  # nothing the second time


def test_a_live_servers_record_and_session_are_left_alone(
    tmp_path: Path, session: Path, spawned: list[subprocess.Popen[str]]
) -> None:
    worker = hold_open(session / "logs" / "worker.out", spawned)
    records = RunRecords(tmp_path / "run")
    records.write(  # this test's own process plays a server that still runs
        RunRecord.for_this_process(port=8001, ray_session_dir=str(session), metrics_dir=None)
    )

    assert records.clean_dead_runs() == []

    assert records.path(8001).exists()
    assert process_start_ticks(worker) is not None


def test_a_reused_pid_does_not_pass_for_the_killed_server(
    tmp_path: Path, session: Path, spawned: list[subprocess.Popen[str]]
) -> None:
    """The killed server's pid now belongs to another process: its start time differs."""
    worker = hold_open(session / "logs" / "worker.out", spawned)
    mine = process_start_ticks(os.getpid())
    assert mine is not None
    record = RunRecord(
        pid=os.getpid(), pid_start_ticks=mine - 1, port=8002, ray_session_dir=str(session)
    )
    records = RunRecords(tmp_path / "run")
    records.write(record)

    assert not record.server_alive()
    assert records.clean_dead_runs() == [record]
    assert process_start_ticks(worker) is None


def test_an_unreadable_record_and_a_half_written_one_are_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "serve-8003.json").write_text("{not json")
    (run / ".serve-8004.json.77.tmp").write_text("{")

    assert RunRecords(run).clean_dead_runs() == []

    assert list(run.iterdir()) == []


def test_a_record_naming_no_ray_session_folder_ends_nothing(
    tmp_path: Path, spawned: list[subprocess.Popen[str]]
) -> None:
    """A damaged record (``/`` as the session) must not make every process look like ours."""
    bystander = hold_open(tmp_path / "some.log", spawned)
    records = RunRecords(tmp_path / "run")
    records.write(RunRecord(pid=dead_pid(), pid_start_ticks=1, port=8005, ray_session_dir="/"))

    records.clean_dead_runs()

    assert process_start_ticks(bystander) is not None
    assert not records.path(8005).exists()


def test_a_record_round_trips_through_its_file(tmp_path: Path) -> None:
    record = RunRecord.for_this_process(
        port=8006, ray_session_dir="/tmp/ray/session_x", metrics_dir=None
    )
    records = RunRecords(tmp_path)
    records.write(record)
    assert records.read_all() == [(records.path(8006), record)]
    assert record.server_alive()
