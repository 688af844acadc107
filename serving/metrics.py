"""Prometheus metrics of the gateway and model servers, in Loom's names.

Gateway and model-server replicas are separate processes; each writes its samples to a shared
folder (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``, set for every
replica through its Ray runtime env) and ``GET /metrics`` merges them. That holds on one node;
on a cluster the monitoring sidecars export per replica instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# seconds: 1 ms .. 30 s, dense where small-model latencies fall
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)

REQUESTS = Counter(
    "loom_requests",
    "HTTP requests answered, by model, route and status.",
    ["model", "route", "status"],
)
REQUESTS_BY_PRINCIPAL = Counter(
    "loom_requests_by_principal",
    "Authenticated requests, by principal (the key's name) and route family (the scope the "
    "route needs, or 'any').",
    ["principal", "route_family"],
)
AUDIT_EVENTS = Counter(
    "loom_audit_events",
    "State-changing calls written to the audit log, by route and outcome (the HTTP status).",
    ["route", "outcome"],
)
REQUEST_LATENCY = Histogram(
    "loom_request_duration_seconds",
    "Time from request received to response sent, by model and route.",
    ["model", "route"],
    buckets=LATENCY_BUCKETS_S,
)
INPUTS = Counter("loom_inputs", "Inputs (texts) processed by model servers.", ["model"])
BATCH_SIZE = Histogram(
    "loom_batch_size", "Inputs per engine run.", ["model"], buckets=BATCH_SIZE_BUCKETS
)
BATCH_LATENCY = Histogram(
    "loom_batch_duration_seconds", "Engine time per batch.", ["model"], buckets=LATENCY_BUCKETS_S
)
QUEUE_DEPTH = Gauge(
    "loom_queue_depth",
    "Inputs admitted but not yet answered, summed over live replicas.",
    ["model"],
    multiprocess_mode="livesum",
)
MODEL_LOAD = Gauge(
    "loom_model_load_seconds",
    "Seconds the latest replica took to load and warm up its model.",
    ["model", "version"],
    multiprocess_mode="mostrecent",
)
REJECTED = Counter("loom_rejected", "Inputs refused by admission control (queue full).", ["model"])
RETRIES = Counter(
    "loom_retries",
    "Calls the gateway sent again because the replica answering them was lost.",
    ["model", "reason"],
)
EXPIRED = Counter(
    "loom_expired_inputs",
    "Inputs a replica dropped uncomputed: their deadline passed before the engine ran them.",
    ["model"],
)
MODEL_LOADS = Counter(
    "loom_model_loads",
    "Models loaded into a running pool replica (multiplexing cache misses), by member.",
    ["model"],
)

SHARD_REQUESTS = Counter(
    "loom_shard_requests",
    "Requests the gateway placed on each shard of a sharded model (the ring's balance, live).",
    ["model", "shard"],
)

# ---- ensembles -------------------------------------------------------------------------
ENSEMBLE_MEMBER_OUTCOMES = Counter(
    "loom_ensemble_member_outcomes",
    "Ensemble member calls by outcome (answered, failed, timed_out).",
    ["ensemble", "member", "outcome"],
)
ENSEMBLE_HEDGES = Counter(
    "loom_ensemble_hedges",
    "Duplicate (hedged) requests sent to a straggling ensemble member.",
    ["ensemble", "member"],
)
ENSEMBLE_HEDGE_WINS = Counter(
    "loom_ensemble_hedge_wins",
    "Hedged requests that answered before the member's first request.",
    ["ensemble", "member"],
)

# ---- generation ------------------------------------------------------------------------
TIME_TO_FIRST_TOKEN = Histogram(
    "loom_time_to_first_token_seconds",
    "Time from a sequence's arrival at its replica to its first generated text.",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)
INTER_TOKEN_LATENCY = Histogram(
    "loom_inter_token_latency_seconds",
    "Time between a sequence's successive tokens (a step's gap divided by its new tokens).",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)
GENERATED_TOKENS = Counter("loom_generated_tokens", "Tokens generated.", ["model"])
RUNNING_SEQUENCES = Gauge(
    "loom_running_sequences",
    "Sequences in the running batch, summed over live replicas.",
    ["model"],
    multiprocess_mode="livesum",
)
WAITING_SEQUENCES = Gauge(
    "loom_waiting_sequences",
    "Sequences admitted but waiting for a slot, summed over live replicas.",
    ["model"],
    multiprocess_mode="livesum",
)


def multiproc_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def prepare_multiproc_dir(path: Path) -> Path:
    """Empty the folder the replicas of one server write their samples into."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink(missing_ok=True)
    return path


def render_latest() -> bytes:
    """The text exposition of every replica's samples (or this process's alone)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        from prometheus_client import REGISTRY

        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry)


def mark_this_process_dead() -> None:
    """Drop this process's live gauges (queue depth) when its replica stops."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(os.getpid(), directory)
