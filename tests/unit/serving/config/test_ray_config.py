"""The ``ray:`` section: the GCS Redis address is checked when the config is built."""

from __future__ import annotations

import pytest

from serving.config import ConfigError, RedisAddress, parse_config

MODELS = [{"name": "minilm", "source": "minilm"}]


def test_gcs_redis_is_off_by_default() -> None:
    assert parse_config({"models": MODELS}).ray.gcs_redis() is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://127.0.0.1:6379", RedisAddress(host="127.0.0.1", port=6379)),
        ("127.0.0.1:6380", RedisAddress(host="127.0.0.1", port=6380)),
        ("rediss://redis.internal:6379", RedisAddress(host="redis.internal", port=6379, tls=True)),
        ("redis://[::1]:6379", RedisAddress(host="::1", port=6379)),
    ],
)
def test_a_redis_address_parses(text: str, expected: RedisAddress) -> None:
    config = parse_config({"models": MODELS, "ray": {"gcs_redis_address": text}})
    assert config.ray.gcs_redis() == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("http://127.0.0.1:6379", "redis:// or rediss://"),
        ("redis://127.0.0.1", "expected host:port"),
        ("redis://127.0.0.1:70000", "out of range"),
        ("redis://:secret@127.0.0.1:6379", "no user, password"),
        ("redis://127.0.0.1:6379/0", "no user, password"),
    ],
)
def test_a_bad_redis_address_is_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match="ray.gcs_redis_address") as raised:
        parse_config({"models": MODELS, "ray": {"gcs_redis_address": text}})
    assert says in str(raised.value)
