"""Rollout settings in the serving config: traffic splits, admin keys, room for a new version."""

from __future__ import annotations

import os

import pytest

from models.settings import LoomEnv
from serving.config import ConfigError, TrainingConfig, parse_config, with_overrides
from serving.server import required_cpus


def config(**model: object):
    return parse_config({"models": [{"name": "m", "source": "minilm", **model}]})


def test_a_traffic_split_is_typed_weights_per_version():
    assert config(traffic={"3": 90, "4": 10}).models[0].traffic == {"3": 90.0, "4": 10.0}


@pytest.mark.parametrize(
    ("traffic", "source", "message"),
    [
        ({"3": 0}, "minilm", "traffic weight of version 3 must be > 0"),
        ({"3": -5}, "minilm", "traffic weight of version 3 must be > 0"),
        ({"3": float("inf")}, "minilm", "traffic weight of version 3 must be > 0"),
        ({}, "minilm", "traffic needs at least one version"),
        ({"../3": 1}, "minilm", "invalid model version"),
        ({"3": 1}, "minilm@3", "source names the store model alone"),
        ({"3": 1}, "minilm#serving", "source names the store model alone"),
    ],
)
def test_a_bad_traffic_split_is_refused_naming_the_field(traffic, source, message):
    with pytest.raises(ConfigError, match="models.0") as info:
        config(source=source, traffic=traffic)
    assert message in str(info.value)


def test_rollout_timings_have_defaults_and_bounds():
    assert config().rollout.poll_interval_s == 0.5
    with pytest.raises(ConfigError, match="rollout.poll_interval_s"):
        parse_config({"models": [{"name": "m", "source": "m"}], "rollout": {"poll_interval_s": 0}})


def test_admin_keys_alone_turn_keys_on_so_a_public_bind_is_allowed():
    env = LoomEnv.from_environ({"LOOM_HOME": "/tmp/loom-test-home"})
    data = {
        "server": {"admin_api_keys": ["a-0123456789abcdef"]},
        "models": [{"name": "m", "source": "m"}],
    }
    overridden = with_overrides(parse_config(data), env=env, host="0.0.0.0")
    assert overridden.server.keys_on
    with pytest.raises(ConfigError, match="without API keys"):
        with_overrides(config(), env=env, host="0.0.0.0")


@pytest.mark.parametrize(
    ("model", "cpus"),
    [
        # following an alias: room for the new version's replicas beside the old ones
        ({"replicas": 2, "num_cpus": 4}, 16),  # 2 x 4 x 2 copies
        ({"source": "minilm@1", "replicas": 2, "num_cpus": 4}, 8),  # pinned: never two
        ({"traffic": {"1": 9, "2": 1}, "replicas": 1, "num_cpus": 8}, 16),  # one per version
    ],
)
def test_a_local_ray_has_room_for_every_version_that_runs_at_once(model, cpus):
    # a local Ray never has fewer logical CPUs than the machine has cores; training off here
    off = config(**model).model_copy(update={"training": TrainingConfig(enabled=False)})
    assert required_cpus(off) == max(cpus, os.cpu_count() or 1)


def test_training_jobs_get_their_own_logical_cpus_beside_serving():
    # 16 for serving (2 x 4 x 2 copies) + 3 for training jobs
    data = {"models": [{"name": "m", "source": "m", "replicas": 2, "num_cpus": 4}]}
    with_training = parse_config({**data, "training": {"cpus": 3}})
    assert required_cpus(with_training) == max(16, os.cpu_count() or 1) + 3
