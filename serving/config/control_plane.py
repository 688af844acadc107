"""The ``control_plane`` section: how `loom serve` processes elect the one that reconciles
rollouts and schedules training jobs (ownership election, ``training.leases``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.leases import ElectionTimings


class ControlPlaneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lease_backend: Literal["store", "kubernetes"] = Field(
        "store",
        description="Where the lease lives: the job store (SQLite or Postgres: every `loom "
        "serve` of a cluster must share it) or Kubernetes Lease objects (coordination.k8s.io).",
    )
    lease_name: str = Field(
        "loom-control-plane",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="The lease's name (a Kubernetes object name: lower case, digits, '-').",
    )
    kubernetes_namespace: str | None = Field(
        None,
        min_length=1,
        description="The namespace of the Lease (kubernetes backend); null: the pod's own (its "
        "service account's), 'default' outside a pod.",
    )
    lease_duration_s: float = Field(
        15.0,
        gt=0,
        description="How long a holder's lease lasts unrenewed: a standby takes over at most "
        "this long plus retry_period_s after the holder dies.",
    )
    renew_deadline_s: float = Field(
        10.0,
        gt=0,
        description="A holder that could not renew for this long gives the role up (before "
        "its lease can expire for a standby).",
    )
    retry_period_s: float = Field(
        2.0, gt=0, description="How often the holder renews and a standby tries to take over."
    )

    @model_validator(mode="after")
    def _timings_hold(self) -> ControlPlaneConfig:
        self.timings()  # duration > renew deadline > 1.2 x retry period, or a clear error
        if self.lease_backend == "kubernetes" and self.lease_duration_s < 1:
            # a Lease counts whole seconds (leaseDurationSeconds): refused here, not at
            # every renewal
            raise ValueError("lease_duration_s must be at least 1 with the kubernetes backend")
        return self

    def timings(self) -> ElectionTimings:
        return ElectionTimings(
            duration_s=self.lease_duration_s,
            renew_deadline_s=self.renew_deadline_s,
            retry_period_s=self.retry_period_s,
        )
