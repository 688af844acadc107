"""``loom serve`` SIGKILLed with jobs queued and running, measured: the third scenario of
``python -m benchmarks.faults`` (``--scenarios restart``).

One server on a fresh ``LOOM_HOME``: the bundled embedding model on one replica and the job
scheduler with ``--restart-training-cpus`` (1) CPUs of its own, so only a few ``digits`` jobs
of one worker run at once and the rest wait QUEUED (``loom serve`` rounds serving's share up
to the machine's cores: on 2 cores, one 1-CPU replica leaves one spare, so two run). The
scenario:

1. submits ``--restart-jobs`` (4) small ``digits`` jobs (``on_restart: resume``, the default)
   over ``POST /v1/jobs``;
2. waits until the API reports at least one RUNNING and one QUEUED;
3. SIGKILLs the ``loom serve`` process alone (a crash: nothing of it runs its shutdown; Ray's
   processes are left to die or linger on their own);
4. starts ``loom serve`` again on the same home and port, and measures the seconds from that
   start until the new run has cleaned up after the killed one and started its own Ray (its
   run record is the new pid's), until ``/v2/health/ready`` answers 200, and until an
   embedding request succeeds;
5. checks that no process of the killed run's Ray session is left, and waits for every job
   to end. Goal: all of them SUCCEEDED (the one that was running resumes by its
   ``on_restart``), and no orphan.

The readiness wait starts only once the run record is the new process's: until the new run
has ended the killed run's leftovers, the killed run's gateway replica may still answer on
the port.

    figures = restart_scenario(work_dir, args)   # the "restart" entry of the JSON

The decisions (the config, the job specs, when to kill, the figures) are plain functions,
tested in ``tests/unit/benchmarks/test_restart_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.embeddings import say
from benchmarks.processes import LOCALHOST, ServerProcess, ServerSpec, child_env, free_port
from benchmarks.setups import EMBEDDINGS_PATH, READY_PATH
from models.settings import LoomEnv
from serving.run_record import RunRecords, session_processes

MODEL = "minilm"
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
POLL_S = 0.25
"""How often the scenario asks the server (or /proc) what it reports."""
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Never through an ``http_proxy``: the server is on 127.0.0.1."""


def add_restart_args(parser: argparse.ArgumentParser) -> None:
    """The scenario's options, on the faults benchmark's parser."""
    group = parser.add_argument_group("restart scenario")
    group.add_argument("--restart-jobs", type=int, default=4, help="digits jobs submitted")
    group.add_argument(
        "--restart-epochs", type=int, default=40, help="epochs per digits job (its length)"
    )
    group.add_argument(
        "--restart-training-cpus", type=float, default=1.0,
        help="CPUs the server adds for training (beside serving's, rounded up to the cores)",
    )  # fmt: skip
    group.add_argument(
        "--restart-timeout-s", type=float, default=900.0,
        help="the longest any one wait (ready, the kill moment, the jobs' end) may take",
    )  # fmt: skip


# ---- decisions ---------------------------------------------------------------------------------


def restart_config(*, port: int, training_cpus: float) -> dict[str, Any]:
    """The served config: the bundled embedding model on one single-threaded replica, and the
    scheduler with ``training_cpus`` of its own, ticking often (a job starts soon after the
    one before it ends)."""
    return {
        "server": {"host": LOCALHOST, "port": port},
        "models": [
            {
                "name": MODEL,
                "source": MODEL,
                "task": "embed",
                "replicas": 1,
                "num_cpus": 1,
                "torch_threads": 1,
            }
        ],
        "training": {"enabled": True, "cpus": training_cpus, "tick_s": 0.2},
    }


def digits_job(index: int, *, epochs: int) -> dict[str, Any]:
    """The body of ``POST /v1/jobs`` for job ``index``: one small MLP on the bundled digits,
    one worker of one CPU, resumed from its last checkpoint if a restart loses it."""
    return {
        "job_id": f"restart-bench-{index}",
        "name": f"digits-restart-{index}",
        "trainer": "digits",
        "hyperparameters": {"arch": "mlp", "epochs": epochs, "seed": index},
        "workers": 1,
        "resources": {"cpu": 1},
        "on_restart": "resume",
    }


def state_counts(jobs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"running": 1, "queued": 3}`` from the API's job objects."""
    return dict(Counter(str(job["state"]) for job in jobs))


def is_kill_moment(jobs: Sequence[Mapping[str, Any]]) -> bool:
    """True once at least one job is RUNNING and another still QUEUED: a kill then loses a
    running job and leaves queued ones for the next run."""
    counts = state_counts(jobs)
    return counts.get("running", 0) >= 1 and counts.get("queued", 0) >= 1


def all_final(jobs: Sequence[Mapping[str, Any]]) -> bool:
    return bool(jobs) and all(job["state"] in FINAL_STATES for job in jobs)


@dataclass(frozen=True, kw_only=True)
class RestartTimes:
    """Seconds from the second start (``Popen``) to each thing the new run reported."""

    cleaned_up_s: float
    """Its run record is the new pid's: the killed run's leftovers were ended, then its own
    Ray started."""
    ready_s: float
    """``/v2/health/ready`` answered 200 (asked only after ``cleaned_up_s``)."""
    serving_s: float
    """An embedding request answered 200 (after ``ready_s``)."""
    jobs_final_s: float
    """Every job had reached a final state."""


def restart_figures(
    *,
    at_kill: Sequence[Mapping[str, Any]],
    at_end: Sequence[Mapping[str, Any]],
    times: RestartTimes,
    killed_run_processes_at_restart: int,
    killed_run_processes_after_ready: int,
) -> dict[str, Any]:
    """The scenario's JSON: what the jobs were at the kill and how each ended (goal: all
    succeeded), the times, and the killed run's processes (goal: none after the restart).

    4 jobs, 1 running and 3 queued at the kill, all 4 succeeded -> ``jobs_completed`` 4 of 4.
    """
    state_at_kill = {str(job["id"]): str(job["state"]) for job in at_kill}
    ended = {str(job["id"]): job for job in at_end}
    jobs = [
        {
            "id": job_id,
            "at_kill": state_at_kill[job_id],
            "on_restart": ended[job_id]["spec"]["on_restart"] if job_id in ended else None,
            "final": ended[job_id]["state"] if job_id in ended else "missing",
            "error": ended[job_id].get("error") if job_id in ended else None,
        }
        for job_id in sorted(state_at_kill)
    ]
    completed = sum(job["final"] == "succeeded" for job in jobs)
    return {
        "jobs": jobs,
        "jobs_at_kill": state_counts(at_kill),
        "jobs_submitted": len(jobs),
        "jobs_completed": completed,
        "all_completed": completed == len(jobs),
        "cleaned_up_s": times.cleaned_up_s,
        "ready_s": times.ready_s,
        "serving_again_s": times.serving_s,
        "jobs_final_s": times.jobs_final_s,
        "killed_run_processes_at_restart": killed_run_processes_at_restart,
        "killed_run_processes_after_ready": killed_run_processes_after_ready,
    }


# ---- talking to the server ---------------------------------------------------------------------


def _request(url: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or None); a connection refused or reset is status 0."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with _DIRECT.open(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


def list_jobs(base: str) -> list[dict[str, Any]]:
    status, answer = _request(f"{base}/v1/jobs")
    if status != 200:
        raise RuntimeError(f"GET /v1/jobs answered {status}")
    return list(answer["data"])


def wait_for(check: Callable[[], bool], what: str, timeout_s: float, server: ServerProcess) -> None:
    """Poll ``check`` until it holds; raise with the server's stderr after ``timeout_s`` or
    when the server exits."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if not server.is_running:
            raise RuntimeError(
                f"loom serve exited while waiting for {what}:\n{server.stderr_tail()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout_s:g} s:\n{server.stderr_tail()}")
        time.sleep(POLL_S)


def _recorded(records: RunRecords, port: int) -> dict[str, Any] | None:
    try:
        return dict(json.loads(records.path(port).read_text()))
    except (OSError, ValueError):
        return None


# ---- the scenario ------------------------------------------------------------------------------


def restart_spec(work_dir: Path, args: argparse.Namespace) -> ServerSpec:
    """``loom serve`` with ``restart_config`` on a free port, ``LOOM_HOME`` under ``work_dir``."""
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "restart.yaml"
    config = restart_config(port=port, training_cpus=args.restart_training_cpus)
    config_path.write_text(yaml.safe_dump(config))
    home = work_dir / "loom_home"
    home.mkdir(parents=True, exist_ok=True)
    argv = (sys.executable, "-m", "loom", "serve", "--config", str(config_path))
    return ServerSpec(
        name="restart",
        argv=(*argv, "--host", LOCALHOST, "--port", str(port)),
        port=port,
        ready_path=READY_PATH,
        log_dir=work_dir / "logs",
        env=child_env({"LOOM_HOME": str(home), "PYTHONUNBUFFERED": "1"}),
        ready_timeout_s=args.restart_timeout_s,
        stop_grace_s=60.0,
    )


def _wait_gone(pids: Callable[[], list[int]], timeout_s: float) -> list[int]:
    """``pids()`` until it is empty or ``timeout_s`` has passed; what it last reported."""
    deadline = time.monotonic() + timeout_s
    left = pids()
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = pids()
    return left


def restart_scenario(work_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = restart_spec(work_dir, args)
    base = f"http://{LOCALHOST}:{spec.port}"
    records = RunRecords(LoomEnv.from_environ({"LOOM_HOME": spec.env["LOOM_HOME"]}).run_dir)
    timeout_s = args.restart_timeout_s
    first = ServerProcess(spec)
    second = ServerProcess(spec)  # the same home, port and config
    sessions: list[str] = []
    try:
        with first:  # started and ready; stopped (here: reaped) on the way out
            say(f"restart: loom serve ready in {first.ready_s:.1f} s")
            killed_session = (_recorded(records, spec.port) or {}).get("ray_session_dir")
            if not killed_session:
                raise RuntimeError("the first run recorded no Ray session of its own")
            sessions.append(killed_session)
            for index in range(args.restart_jobs):
                body = digits_job(index, epochs=args.restart_epochs)
                status, _ = _request(f"{base}/v1/jobs", body)
                if status != 201:
                    raise RuntimeError(f"POST /v1/jobs answered {status} for job {index}")
            at_kill: list[dict[str, Any]] = []

            def kill_moment() -> bool:
                at_kill[:] = list_jobs(base)
                if all_final(at_kill):
                    raise RuntimeError(f"every job ended before the kill: {state_counts(at_kill)}")
                return is_kill_moment(at_kill)

            wait_for(kill_moment, "a job RUNNING and another QUEUED", timeout_s, first)
            os.kill(first.pid, signal.SIGKILL)  # the server process alone, as a crash
            _wait_gone(lambda: [first.pid] if first.is_running else [], timeout_s)
            say(f"restart: SIGKILL to loom serve (pid {first.pid}), jobs {state_counts(at_kill)}")
            leftovers_at_restart = len(session_processes(killed_session))

            started = time.monotonic()
            second.start()
            wait_for(
                lambda: (_recorded(records, spec.port) or {}).get("pid") == second.pid,
                "the new run's record",
                timeout_s,
                second,
            )
            cleaned_up_s = time.monotonic() - started
            sessions.append(str((_recorded(records, spec.port) or {}).get("ray_session_dir")))
            wait_for(lambda: _request(base + READY_PATH)[0] == 200, "ready", timeout_s, second)
            ready_s = time.monotonic() - started
            embed = {"model": MODEL, "input": ["served again after a crash"]}
            wait_for(
                lambda: _request(base + EMBEDDINGS_PATH, embed)[0] == 200,
                "an embedding",
                timeout_s,
                second,
            )
            serving_s = time.monotonic() - started
            leftovers_after_ready = len(session_processes(killed_session))
            say(
                f"restart: cleaned up in {cleaned_up_s:.1f} s, ready in {ready_s:.1f} s, "
                f"serving embeddings in {serving_s:.1f} s; {leftovers_at_restart} process(es) "
                f"of the killed run at the restart, {leftovers_after_ready} after"
            )
            at_end: list[dict[str, Any]] = []

            def jobs_final() -> bool:
                at_end[:] = list_jobs(base)
                return all_final(at_end)

            wait_for(jobs_final, "every job's end", timeout_s, second)
            jobs_final_s = time.monotonic() - started
            second.stop()  # Ctrl-C: a clean stop, before the killed run's group is reaped
    finally:
        if second.stop_record is None and second.is_running:
            second.stop()
    # a clean stop leaves no process of either run's Ray session (15 s, as the e2e tier gives)
    left_after_stop = _wait_gone(
        lambda: [pid for session in sessions for pid in session_processes(session)], 15.0
    )
    times = RestartTimes(
        cleaned_up_s=cleaned_up_s,
        ready_s=ready_s,
        serving_s=serving_s,
        jobs_final_s=jobs_final_s,
    )
    figures = restart_figures(
        at_kill=at_kill,
        at_end=at_end,
        times=times,
        killed_run_processes_at_restart=leftovers_at_restart,
        killed_run_processes_after_ready=leftovers_after_ready,
    )
    figures |= {
        "first_ready_s": first.ready_s,
        "second_stop": second.describe(),
        "ray_processes_left_after_clean_stop": len(left_after_stop),
    }
    say(
        f"restart: {figures['jobs_completed']} of {figures['jobs_submitted']} jobs succeeded "
        f"({jobs_final_s:.1f} s after the restart); jobs at the kill {figures['jobs_at_kill']}; "
        f"{len(left_after_stop)} Ray process(es) left after a clean stop"
    )
    return figures
