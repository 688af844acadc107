"""The fields every job spec has, whatever its trainer: the base each trainer's spec extends.

A trainer's spec class (``training/trainers/<name>_spec.py``) narrows ``trainer`` to its own
name and adds its dataset, hyperparameters and evaluation thresholds:

    class LmJobSpec(JobSpec):
        trainer: Literal["lm"] = Field(description="The registered trainer to run.")
        hyperparameters: LmHyperparameters = Field(default_factory=LmHyperparameters, ...)

The trainer registry (``training.trainers.registry``) names each trainer's class once, and
``training.spec`` reads a raw spec as the class its ``trainer`` picks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl


class StrictModel(BaseModel):
    """Frozen, a field nobody declared is refused, not ignored, and a float must be finite
    (``.inf`` in a YAML spec, or a NaN, would pass ``gt=0`` and break the job later)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class WorkerResources(StrictModel):
    """What each worker of the job reserves on the cluster."""

    cpu: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed).")
    gpu: float = Field(0.0, ge=0, description="GPUs reserved per worker; 0 trains on CPU.")


class JobSpec(StrictModel):
    """A job for some registered trainer: the fields they all share. Never parsed as itself:
    ``training.spec.parse_job_spec`` returns the trainer's own subclass."""

    trainer: str = Field(description="The registered trainer to run.")
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description=(
            "The job's label and the store name its model versions are registered under: "
            "letters, digits, '.', '_', '-', at most 64; not unique among jobs."
        ),
    )
    workers: int = Field(1, ge=1, le=256, description="Data-parallel workers for the train stage.")
    resources: WorkerResources = Field(
        default_factory=WorkerResources, description="Reserved per worker, not per job."
    )
    priority: int = Field(
        0, ge=0, le=100, description="Higher runs first; equal priorities run in submit order."
    )
    max_retries: int = Field(
        0, ge=0, le=10, description="Times a failed run is retried before the job fails."
    )
    stage_workers: int = Field(
        2, ge=1, le=256, description="Queue workers for each parallel stage (shards, members)."
    )
    on_restart: Literal["resume", "fail"] = Field(
        "resume",
        description=(
            "When a restart of the scheduler loses a running job: 'resume' queues it again to "
            "go on from its last checkpoint, 'fail' fails it with the reason."
        ),
    )
    promote: bool = Field(
        False, description="On success, move the model's 'serving' alias to the new version."
    )
    webhook_url: HttpUrl | None = Field(
        None, description="http(s) URL that receives each job event as a CloudEvent; optional."
    )
