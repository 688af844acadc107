"""The ``monitoring`` section: the sidecars, their stats folder, and where the autoscaling
policy reads metrics from."""

from __future__ import annotations

from pathlib import Path

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator


class MonitoringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sidecar_host: str = Field(
        "127.0.0.1",
        description="Address each node's monitoring sidecar listens on (0.0.0.0 to let a "
        "Prometheus on another machine scrape it: it serves metrics only, no keys).",
    )
    sidecar_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="The sidecars' port; 0: any free one (Prometheus finds them through "
        "GET /v1/admin/targets either way).",
    )
    sidecar_actor: bool = Field(
        True,
        description="Start each node's sidecar as a Ray actor pinned to the node; off where "
        "the sidecar runs as a container beside the Ray worker (Kubernetes): one is then "
        "found at sidecar_port on every Ray node that offers CPUs or GPUs.",
    )
    stats_dir: Path | None = Field(
        None,
        description="The node-local folder where each replica writes its stats file and the "
        "sidecar reads them; None: $LOOM_HOME/run/stats.",
    )
    stats_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often a replica rewrites its stats file."
    )
    prometheus_url: AnyHttpUrl | None = Field(
        None,
        description="A Prometheus that scrapes the sidecars (through /v1/admin/targets): the "
        "autoscaling policy reads its HTTP query API; None: the policy reads the sidecars.",
    )
    rate_window_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="The window the policy averages queue depth and takes the latency p95 "
        "over (with Prometheus: keep it at least twice its scrape interval).",
    )
    poll_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often the autoscaling policy reads the metrics it decides on.",
    )

    @model_validator(mode="after")
    def _containers_have_a_port(self) -> MonitoringConfig:
        if not self.sidecar_actor and self.sidecar_port == 0:
            raise ValueError(
                "sidecar_actor: false needs a sidecar_port: where each node's sidecar "
                "container listens (the gateway and the policy look for it there)"
            )
        return self
