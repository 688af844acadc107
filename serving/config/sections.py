"""The sections every deployed model entry has: replicas or autoscaling, batching, limits,
and for a generate model its continuous-batching settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingConfig(_Section):
    """Replicas between ``min_replicas`` and ``max_replicas``, decided by Loom's policy
    (``serving.autoscaling``) from what the monitoring sidecars report: each signal asks for
    ``ceil(current x observed / target)`` replicas and the largest ask wins, held for the
    delay of its direction first."""

    min_replicas: int = Field(
        1,
        ge=0,
        description="Fewest replicas kept running; 0 scales to zero when idle (the next "
        "request waits for a replica to start, up to its deadline, then 503 with Retry-After).",
    )
    max_replicas: int = Field(2, ge=1, description="Most replicas the autoscaler may start.")
    target_queue_depth: float = Field(
        8.0,
        gt=0,
        description="Inputs (sequences, for generation) queued or in progress per replica "
        "the policy aims for: 40 queued over 2 replicas with a target of 10 -> 4 replicas.",
    )
    latency_slo_ms: float | None = Field(
        None,
        gt=0,
        description="The p95 of a request's time in the replica the policy keeps under; "
        "None: latency is not a signal.",
    )
    target_waiting_sequences: float = Field(
        2.0,
        gt=0,
        description="Generation: sequences waiting for a slot per replica the policy aims for.",
    )
    target_kv_cache_use: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Generation: share of the KV cache in use the policy aims for.",
    )
    policy: Literal["loom", "serve"] = Field(
        "loom",
        description="loom: Loom's policy on the sidecars' metrics (every signal above); "
        "serve: Ray Serve's built-in policy on requests in flight at the handles, with "
        "target_queue_depth as its target_ongoing_requests (for comparison).",
    )
    upscale_delay_s: float = Field(
        5.0,
        ge=0,
        description="How long every reading must ask for more replicas before they start.",
    )
    downscale_delay_s: float = Field(
        60.0,
        ge=0,
        description="How long every reading must ask for fewer replicas before they stop.",
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class BatchingConfig(_Section):
    max_batch_size: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most inputs in one engine run (64: MiniLM's best on 2 CPU cores).",
    )
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="Longest a free engine holds a partial batch back for more inputs; only "
        "waited when the arrival rate says more are due within it (a lone request runs at once).",
    )


class LimitsConfig(_Section):
    max_inputs: int = Field(256, ge=1, description="Most inputs in one request (else 413).")
    max_input_chars: int = Field(
        20_000, ge=1, description="Longest single input in characters (else 413)."
    )
    max_queued: int = Field(
        1024,
        ge=1,
        description="Inputs (sequences, for generation) a replica admits before answering 503 "
        "with Retry-After.",
    )
    max_queue_wait_ms: float | None = Field(
        1000.0,
        gt=0,
        description="Embed and classify: the longest an input may expect to wait for its engine "
        "run (inputs admitted ahead of it / the measured drain rate); a call that would wait "
        "longer is refused with 503 and Retry-After, so overload is shed rather than queued. "
        "The gateway holds the same budget in its own queue: a request that waited there that "
        "long is shed (503) before any hop. null: only max_queued bounds the queue.",
    )


class GenerationSettings(_Section):
    """How a generate model's replica batches sequences (transformers' continuous batching)."""

    max_sequences: int = Field(
        32, ge=1, le=1024, description="Most sequences decoding together in one replica."
    )
    max_batch_tokens: int = Field(
        1024,
        ge=16,
        description="Most tokens in one step: prompt chunks being prefilled plus one per "
        "decoding sequence.",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=64,
        description="KV cache size in tokens; default: max_sequences full contexts.",
    )
    max_queued_tokens: int = Field(
        262_144,
        ge=64,
        description="Tokens a replica admits at once, counting each sequence's prompt tokens "
        "plus its max_tokens (a prompt x n x max_tokens product, not a count of prompts); past "
        "it a call is refused with 503 and Retry-After. 262,144: 1024 sequences of 256.",
    )
    max_request_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="The most of the replica's admission budget (limits.max_queued sequences, "
        "max_queued_tokens tokens) one request may take; a larger request is refused with 413 "
        "request_too_large, naming its prompts x n x max_tokens (it could never be served "
        "whole). One sequence of a full context is always allowed.",
    )
    stream_interval_ms: float = Field(
        100.0,
        ge=0,
        le=1000,
        description="After a choice's first text, stream at most one chunk per this interval "
        "(0: one per decoding step). Fewer, fuller chunks cost less: on 2 cores, 32 streams "
        "of a 10M GPT-2 gave ~650 tokens/s at 0 and ~930 at 100 ms; 8 streams ~390 and ~600.",
    )
