"""The restart scenario's plain parts: the config and job bodies it sends are what the server
and the jobs API accept, it kills only with a job running and another queued, and its figures
count every job it saw at the kill."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from benchmarks.faults import parse_args
from benchmarks.restart import (
    RestartTimes,
    all_final,
    digits_job,
    is_kill_moment,
    restart_config,
    restart_figures,
)
from serving.config import LoomConfig, ModelConfig
from training.spec import ClusterCapacity, validate_job_spec


def job(job_id: str, state: str, on_restart: str = "resume", error: str | None = None) -> dict:
    """A job as ``GET /v1/jobs`` shows it (the fields the scenario reads)."""
    return {"id": job_id, "state": state, "error": error, "spec": {"on_restart": on_restart}}


def test_the_served_config_is_one_embedding_replica_and_training_on_its_own_cpu() -> None:
    config = LoomConfig.model_validate(restart_config(port=8123, training_cpus=1.0))
    assert config.server.port == 8123
    [model] = config.models
    assert isinstance(model, ModelConfig)
    assert (model.name, model.replicas) == ("minilm", 1)
    assert config.training.enabled
    assert config.training.cpus == 1.0


def test_the_job_bodies_pass_the_jobs_api_gate_and_resume_after_a_restart() -> None:
    bodies = [digits_job(i, epochs=40) for i in range(3)]
    assert len({body["job_id"] for body in bodies}) == 3
    for body in bodies:
        raw = {k: v for k, v in body.items() if k != "job_id"}  # the API pops job_id first
        spec = validate_job_spec(
            raw, capacity=ClusterCapacity(total_cpus=1, total_gpus=0), allowed_dataset_roots=[]
        )
        assert spec.trainer == "digits"
        assert spec.on_restart == "resume"
        # 1 worker x 1 CPU each: a few run at once on the CPUs training has, the rest queue
        assert spec.workers * spec.resources.cpu == 1


@pytest.mark.parametrize(
    ("states", "kill"),
    [
        (["queued", "queued"], False),  # nothing running yet: a kill loses no running job
        (["running", "succeeded"], False),  # nothing left queued
        (["running", "queued", "queued"], True),
        (["succeeded", "running", "queued"], True),
        ([], False),
    ],
)
def test_the_kill_waits_for_a_running_job_and_a_queued_one(states: list[str], kill: bool) -> None:
    assert is_kill_moment([job(str(i), s) for i, s in enumerate(states)]) is kill


def test_jobs_are_final_only_when_every_one_has_ended() -> None:
    assert not all_final([])
    assert not all_final([job("a", "succeeded"), job("b", "running")])
    assert all_final([job("a", "succeeded"), job("b", "failed"), job("c", "cancelled")])


def test_figures_count_each_job_seen_at_the_kill_by_how_it_ended() -> None:
    at_kill = [job("a", "succeeded"), job("b", "running"), job("c", "queued"), job("d", "queued")]
    at_end = [
        job("a", "succeeded"),
        job("b", "succeeded"),  # resumed after the restart
        job("c", "failed", error="boom"),
        # d is not listed at the end: counted missing, never completed
    ]
    times = RestartTimes(cleaned_up_s=2.0, ready_s=20.0, serving_s=21.5, jobs_final_s=90.0)
    figures = restart_figures(
        at_kill=at_kill,
        at_end=at_end,
        times=times,
        killed_run_processes_at_restart=6,
        killed_run_processes_after_ready=0,
    )
    assert figures["jobs_at_kill"] == {"succeeded": 1, "running": 1, "queued": 2}
    # 4 seen at the kill; a and b succeeded, c failed, d missing -> 2 of 4
    assert (figures["jobs_submitted"], figures["jobs_completed"]) == (4, 2)
    assert figures["all_completed"] is False
    by_id: dict[str, Any] = {j["id"]: j for j in figures["jobs"]}
    assert by_id["b"] == {
        "id": "b", "at_kill": "running", "on_restart": "resume", "final": "succeeded",
        "error": None,
    }  # fmt: skip
    assert by_id["c"]["error"] == "boom"
    assert by_id["d"]["final"] == "missing"
    assert (figures["ready_s"], figures["serving_again_s"]) == (20.0, 21.5)
    assert figures["killed_run_processes_after_ready"] == 0


def test_the_faults_benchmark_takes_the_restart_scenario_and_its_options() -> None:
    args: argparse.Namespace = parse_args(
        ["--scenarios", "restart", "--restart-jobs", "6", "--restart-epochs", "10"]
    )
    assert args.scenarios == "restart"
    assert (args.restart_jobs, args.restart_epochs, args.restart_training_cpus) == (6, 10, 1.0)
    # the default run stays as it was: the restart scenario is asked for by name
    assert parse_args([]).scenarios == "kill,overload"
