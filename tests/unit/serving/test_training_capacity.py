"""What one job may reserve: the capacity set aside for training, not the cluster's total
(which counts the serving replicas' reservations too)."""

from __future__ import annotations

import pytest

from serving.config import LoomConfig
from serving.gateway.routes import jobs
from serving.server import training_cpus


def config(**training: object) -> LoomConfig:
    return LoomConfig.model_validate(
        {"models": [{"name": "minilm", "task": "embed", "source": "minilm"}], "training": training}
    )


def test_the_capacity_for_jobs_is_what_training_has_not_the_clusters_total(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 12 CPUs in the cluster, 8 of them held by serving replicas; 4 set aside for training
    monkeypatch.setattr(jobs.ray, "cluster_resources", lambda: {"CPU": 12.0, "GPU": 1.0})
    capacity = jobs.ray_capacity(4.0, 0.0)
    assert (capacity.total_cpus, capacity.total_gpus) == (4.0, 0.0)
    # never more than the cluster holds: 64 set aside on a 12-CPU cluster -> 12
    assert jobs.ray_capacity(64.0, None).total_cpus == 12.0
    # nothing set aside (a cluster, training.cpus unset): the cluster's total
    assert jobs.ray_capacity(None, None).total_gpus == 1.0


def test_training_cpus_are_the_config_else_the_machine_on_a_local_ray_else_the_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert training_cpus(config(cpus=2), local_ray=True) == 2.0
    assert training_cpus(config(cpus=2), local_ray=False) == 2.0
    assert training_cpus(config(), local_ray=True) == 6.0  # what a local Ray adds for jobs
    assert training_cpus(config(), local_ray=False) is None  # the cluster's total


def test_the_placement_wait_is_a_positive_config_field() -> None:
    assert config().training.max_placement_wait_s == 600.0
    assert config(max_placement_wait_s=30).training.max_placement_wait_s == 30.0
    with pytest.raises(ValueError, match="max_placement_wait_s"):
        config(max_placement_wait_s=0)
