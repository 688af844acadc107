"""The Ray Serve deployment of each replica kind: which class, how many replicas, what they
reserve, how Serve routes to them and how long they drain.

    deployment = replica_deployment(config, scaling=Source(stats_dir=...))  # the reconciler's
    app = deployment.bind(config.model_dump(), models_dir, ReplicaMonitoring(stats_dir=...))
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from serving.autoscaling.pollers import Source
from serving.autoscaling.ray_policy import autoscaling_config
from serving.config.model import DeployedEntry, ModelConfig, PoolConfig
from serving.replicas.generation import GenerationReplica
from serving.replicas.inference import InferenceReplica, pool_replica_class
from serving.routing.hedge_router import HedgeAwareRouter

DEPLOYMENT_PREFIX = "model-"
HEDGE_AWARE_ROUTER = f"{HedgeAwareRouter.__module__}.{HedgeAwareRouter.__qualname__}"
"""The router class by import path (what Serve stores of a class it is given)."""


def model_deployment_name(model: str) -> str:
    """The deployment's name inside its version app: ``model-<name>``."""
    return f"{DEPLOYMENT_PREFIX}{model}"


def replica_class(config: DeployedEntry) -> type[Any]:
    """The replica class of an entry: generation, a pool, or a plain embed/classify model."""
    if isinstance(config, PoolConfig):
        return pool_replica_class(config.multiplex.max_models_per_replica)
    if config.task == "generate":
        return GenerationReplica
    return InferenceReplica


def replica_deployment(config: DeployedEntry, *, scaling: Source | None = None) -> serve.Deployment:
    """The Serve deployment of one entry: its replica class, replicas (fixed, or scaled by
    Loom's policy reading ``scaling``), resources, admission headroom, request router and
    drain time."""
    if isinstance(config, PoolConfig):
        loaded_at_once = min(len(config.multiplex.models), config.multiplex.max_models_per_replica)
        # admission is per member (each one's bounded queue); Ray's limit stays out of it
        max_ongoing = config.limits.max_queued * loaded_at_once + 64
        # Serve's own router: its FIFO matching hands a free replica holding a member to a
        # request for that member. HedgeAwareRouter routes out of order, and a 4-replica pool
        # of 24 members loaded 16 times in a 20 s run against 1 (benchmarks.sharding)
        router = RequestRouterConfig()
    else:
        # admission is ours (bounded queue -> 503); Ray's own limit only stays out of its way
        max_ongoing = config.limits.max_queued + 64
        # Serve's power of two choices, and an ensemble's hedge skips its first call's replica
        # the pydantic plugin reads Ray's field as a dict (it takes a class or its path)
        router = RequestRouterConfig(request_router_class=HEDGE_AWARE_ROUTER)  # type: ignore[arg-type]
    generates = isinstance(config, ModelConfig) and config.task == "generate"
    options: dict[str, Any] = {
        "name": model_deployment_name(config.name),
        "max_ongoing_requests": max_ongoing,
        "ray_actor_options": {
            "num_cpus": config.num_cpus,
            "num_gpus": config.num_gpus,
        },
        # a replica being replaced first finishes what it holds: a generation may stream
        # for a minute or more, a batch of embeddings takes milliseconds
        "graceful_shutdown_timeout_s": 120 if generates else 10,
        "health_check_period_s": 10,
        "request_router_config": router,
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = autoscaling_config(
            config.name, config.task, config.autoscaling, scaling or Source(stats_dir="")
        )
    else:
        options["num_replicas"] = config.replicas or 1
    return serve.deployment(**options)(replica_class(config))
