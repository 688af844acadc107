"""The serving config: one typed, validated model per section (``loom.yaml`` -> ``LoomConfig``).

``loom.py`` holds the whole config and its loading, ``model.py`` the three kinds of model
entry (plain model, pool, ensemble), and one module per section beside them. The names most
callers need are importable from here.
"""

from serving.config.loom import (
    ConfigError,
    LoomConfig,
    RolloutConfig,
    TrainingConfig,
    default_config,
    in_cluster,
    load_config,
    parse_config,
    with_overrides,
)
from serving.config.model import (
    DeployedEntry,
    EnsembleEntry,
    ModelConfig,
    PoolConfig,
    ServedEntry,
    parse_entry,
)
from serving.config.pool import POOL_VERSION, PoolMember
from serving.config.ray_head import RayConfig, RedisAddress

__all__ = [
    "POOL_VERSION",
    "ConfigError",
    "DeployedEntry",
    "EnsembleEntry",
    "LoomConfig",
    "ModelConfig",
    "PoolConfig",
    "PoolMember",
    "RayConfig",
    "RedisAddress",
    "RolloutConfig",
    "ServedEntry",
    "TrainingConfig",
    "default_config",
    "in_cluster",
    "load_config",
    "parse_config",
    "parse_entry",
    "with_overrides",
]
