"""The gateway's own Prometheus metrics (``GET /metrics``), in Loom's names.

Only the gateway's process runs Prometheus code: requests, latency, principals, audit
events, sheds, retries, shard placement and ensembles, all seen at the gateway. What the
model replicas do (queue depth, batches, tokens, cache use) they report to their node's
monitoring sidecar, which exports it per replica (``serving.monitoring``).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from serving.monitoring.stats import LATENCY_BUCKETS_S

CONTENT_TYPE = CONTENT_TYPE_LATEST

REQUESTS = Counter(
    "loom_requests",
    "Requests answered, by model, route and status (gRPC calls: route grpc_<route>, status "
    "the HTTP status of the same answer).",
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
REJECTED = Counter(
    "loom_rejected",
    "Inputs the gateway shed before calling a replica (the model's calls in flight at their "
    "bound, or more queued than the replicas clear within the wait budget).",
    ["model"],
)

RETRIES = Counter(
    "loom_retries",
    "Calls the gateway sent again because the replica answering them was lost.",
    ["model", "reason"],
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


def render_latest() -> bytes:
    """The text exposition of the gateway's metrics."""
    return generate_latest(REGISTRY)
