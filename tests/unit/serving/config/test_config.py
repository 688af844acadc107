from __future__ import annotations

from pathlib import Path

import pytest

from models.settings import LoomEnv
from serving.config import ConfigError, default_config, load_config, parse_config, with_overrides


def env(**values: str) -> LoomEnv:
    return LoomEnv.from_environ({"LOOM_HOME": "/tmp/loom-test-home", **values})


def test_default_config_serves_minilm_on_loopback_port_8000_one_replica_per_core():
    config = default_config(cpus=2)
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert [m.name for m in config.models] == ["minilm"]
    assert (config.models[0].replicas, config.models[0].threads) == (2, 1)
    assert default_config(cpus=32).models[0].replicas == 8  # capped


def test_yaml_file_becomes_typed_config(tmp_path: Path):
    path = tmp_path / "loom.yaml"
    path.write_text(
        """
server: {host: 127.0.0.1, port: 9000, api_keys: [k1-0123456789abcdef]}
models:
  - name: mini
    source: minilm@1
    task: embed
    autoscaling: {min_replicas: 1, max_replicas: 3}
    batching: {max_batch_size: 16, max_wait_ms: 2}
    limits: {max_inputs: 8, max_input_chars: 100, max_queued: 64}
"""
    )
    config = load_config(path)
    model = config.models[0]
    assert config.server.port == 9000
    assert model.autoscaling is not None
    assert model.autoscaling.max_replicas == 3
    assert model.batching.max_batch_size == 16
    assert model.limits.max_queued == 64


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (
            {"models": [{"name": "m", "source": "minilm", "batching": {"max_batch_size": 0}}]},
            "models.0.batching.max_batch_size",
        ),
        ({"models": [{"name": "m", "source": "minilm", "task": "dance"}]}, "models.0.task"),
        ({"models": [{"name": "m", "source": "../etc/passwd"}]}, "models.0.source"),
        ({"models": [{"name": "m", "source": "minilm", "colour": "red"}]}, "models.0.colour"),
        ({"server": {"port": 70000}, "models": [{"name": "m", "source": "minilm"}]}, "server.port"),
        ({"models": []}, "models"),
        (
            {
                "models": [
                    {
                        "name": "m",
                        "source": "minilm",
                        "autoscaling": {"min_replicas": 3, "max_replicas": 2},
                    }
                ]
            },
            "models.0.autoscaling",
        ),
    ],
)
def test_invalid_config_error_names_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value)


def test_duplicate_model_names_are_refused():
    with pytest.raises(ConfigError, match="repeated: m"):
        parse_config({"models": [{"name": "m", "source": "a"}, {"name": "m", "source": "b"}]})


def test_not_yaml_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_binding_a_public_address_without_keys_is_refused():
    with pytest.raises(ConfigError, match="without API keys"):
        with_overrides(default_config(), env=env(), host="0.0.0.0")


def test_public_address_with_keys_from_the_environment_is_allowed():
    config = with_overrides(
        default_config(),
        env=env(LOOM_API_KEYS="a-0123456789abcdef, b-0123456789abcdef"),
        host="0.0.0.0",
        port=9001,
    )
    assert config.server.api_keys == ("a-0123456789abcdef", "b-0123456789abcdef")
    assert config.server.port == 9001
