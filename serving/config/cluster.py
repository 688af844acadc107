"""The ``cluster:`` section: how Loom runs on a Kubernetes cluster made by KubeRay.

``loom deploy render`` turns the whole config into manifests (``deploy/``); ``loom serve
--in-cluster`` (the head pod's command) runs the control plane as this section says. A local
``loom serve`` ignores the section, so one config file serves the laptop and the cluster.

    cluster:
      image: registry.example.com/loom:0.1.0-gpu
      gateway: {replicas: 2}
      gpu_workers: {max_replicas: 4, gpus: 1}

What it changes when ``loom serve --in-cluster`` runs (``in_cluster``): the gateway runs
``gateway.replicas`` replicas, one per gateway pod (each takes the pod's one
``GATEWAY_RESOURCE``), on all interfaces; each worker pod's sidecar is a container at
``sidecar_port`` that reads the pod's ``stats_dir`` (no sidecar actors).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GATEWAY_RESOURCE = "loom_gateway"
"""The Ray resource each gateway pod offers one of and each gateway replica takes one of: one
gateway per pod, never on the head or a model worker."""

_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _quantity(value: str) -> str:
    if not _QUANTITY.fullmatch(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 2, 500m, 8Gi)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PodSize(_Strict):
    """What one pod requests, and is limited to (requests = limits: Guaranteed QoS, so the
    kubelet does not evict a replica under node pressure before a batch job's pod)."""

    cpu: str = Field("2", description="CPU cores (a quantity: 2, 500m).")
    memory: str = Field("8Gi", description="Memory (a quantity: 8Gi).")

    @field_validator("cpu", "memory")
    @classmethod
    def _is_quantity(cls, value: str) -> str:
        return _quantity(value)

    @property
    def cpus(self) -> float:
        """The CPU quantity as cores: ``500m`` -> 0.5."""
        return float(self.cpu[:-1]) / 1000 if self.cpu.endswith("m") else float(self.cpu)


class GatewayPods(PodSize):
    replicas: int = Field(
        2,
        ge=1,
        description="Gateway pods, each running one gateway replica that serves server.port; "
        "the gateway Service spreads clients over them.",
    )
    cpu: str = Field("2", description="CPU cores per gateway pod.")
    memory: str = Field("4Gi", description="Memory per gateway pod.")


class WorkerGroup(PodSize):
    """A Ray worker group: pods that run model replicas and training workers."""

    replicas: int = Field(1, ge=0, description="Pods at start.")
    min_replicas: int = Field(0, ge=0, description="Fewest pods the Ray autoscaler keeps.")
    max_replicas: int = Field(4, ge=0, description="Most pods the Ray autoscaler makes.")

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroup:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"need min_replicas <= replicas <= max_replicas, got {self.min_replicas} <= "
                f"{self.replicas} <= {self.max_replicas}"
            )
        return self


class Toleration(_Strict):
    key: str = Field(description="The taint's key, e.g. nvidia.com/gpu.")
    operator: Literal["Exists", "Equal"] = Field("Exists", description="Exists or Equal.")
    value: str | None = Field(None, description="With Equal: the taint's value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        "NoSchedule", description="The taint's effect; null: any."
    )


class GpuWorkerGroup(WorkerGroup):
    """The GPU worker group (the ``gpu`` overlay): pods that each hold ``gpus`` GPUs."""

    gpus: int = Field(1, ge=1, description="GPUs per pod (nvidia.com/gpu).")
    gpu_resource: str = Field(
        "nvidia.com/gpu", description="The extended resource the device plugin offers."
    )
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="Node labels the GPU pods must land on (default: the label NVIDIA's GPU "
        "feature discovery sets).",
    )
    tolerations: tuple[Toleration, ...] = Field(
        (Toleration(key="nvidia.com/gpu"),),
        description="Taints of the GPU nodes the pods tolerate.",
    )
    cpu: str = Field("8", description="CPU cores per GPU pod.")
    memory: str = Field("32Gi", description="Memory per GPU pod.")


class Storage(_Strict):
    class_name: str | None = Field(
        None,
        description="A StorageClass that offers ReadWriteMany (NFS, CephFS, EFS, Filestore); "
        "null: the cluster's default class, which must offer it.",
    )
    size: str = Field(
        "100Gi", description="The shared volume: $LOOM_HOME (model store, job workspaces)."
    )

    @field_validator("size")
    @classmethod
    def _is_quantity(cls, value: str) -> str:
        return _quantity(value)


class Autoscaler(_Strict):
    enabled: bool = Field(True, description="Run Ray's autoscaler (KubeRay in-tree) in the head.")
    idle_timeout_s: int = Field(
        60, ge=0, description="A worker pod idle this long is removed (down to min_replicas)."
    )
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = Field(
        "Default", description="How fast the Ray autoscaler adds pods."
    )


class ClusterConfig(_Strict):
    name: str = Field(
        "loom",
        max_length=40,
        description="The RayCluster's name, and the prefix of every object rendered.",
    )
    image: str = Field(
        "loom:0.1.0-cpu",
        min_length=1,
        description="The Loom image every pod runs (deploy/docker/Dockerfile), pushed where "
        "the cluster pulls from: registry/name:tag, a digest for production.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="The pods' imagePullPolicy."
    )
    head: PodSize = Field(
        default_factory=lambda: PodSize(cpu="2", memory="8Gi"),
        description="The head pod: Ray's GCS, the autoscaler and Loom's control plane "
        "(`loom serve --in-cluster`); no replica runs there (num-cpus 0).",
    )
    gateway: GatewayPods = Field(default_factory=GatewayPods)
    cpu_workers: WorkerGroup = Field(
        default_factory=lambda: WorkerGroup(replicas=1, min_replicas=1, max_replicas=4),
        description="The CPU worker group: model replicas without GPUs, training workers.",
    )
    gpu_workers: GpuWorkerGroup = Field(
        default_factory=GpuWorkerGroup,
        description="The GPU worker group, rendered by the gpu overlay only.",
    )
    storage: Storage = Field(default_factory=Storage)
    autoscaler: Autoscaler = Field(default_factory=Autoscaler)
    database_secret: str = Field(
        "loom-db",
        description="The Secret holding LOOM_DB_URL (the Postgres job store every control "
        "plane shares), under the key LOOM_DB_URL.",
    )
    keys_secret: str = Field(
        "loom-api-keys",
        description="The Secret holding keys.json (`loom keys create` writes it: salted "
        "digests, no key): the gateway listens on all interfaces, so keys are required.",
    )
    sidecar_port: int = Field(
        9470, ge=1024, le=65535, description="The monitoring sidecar container's port."
    )
    stats_dir: str = Field(
        "/var/run/loom/stats",
        description="The node-local folder (an emptyDir per pod) where replicas write their "
        "stats and the sidecar container reads them.",
    )
    home: str = Field(
        "/var/lib/loom", description="LOOM_HOME in every pod: the shared volume's mount."
    )

    @field_validator("name")
    @classmethod
    def _a_label(cls, name: str) -> str:
        if not _LABEL.fullmatch(name):
            raise ValueError("a cluster name is lower case letters, digits and '-'")
        return name

    @field_validator("stats_dir", "home")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not PurePosixPath(value).is_absolute():
            raise ValueError(f"{value} must be an absolute path in the pod")
        return value

    @model_validator(mode="after")
    def _stats_off_the_shared_volume(self) -> ClusterConfig:
        stats, home = PurePosixPath(self.stats_dir), PurePosixPath(self.home)
        if stats == home or home in stats.parents:
            raise ValueError(
                "stats_dir must be node-local, not under home (the shared volume): each "
                "node's sidecar reads only its own replicas"
            )
        return self
