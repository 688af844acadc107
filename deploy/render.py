"""Loom's config -> the Kubernetes objects that run it on a KubeRay cluster.

The config is the one source of truth: the objects are computed from it, and it travels
whole in a ConfigMap that the head pod's ``loom serve --in-cluster`` reads. The shape (why a
RayCluster with the control plane in its head, not a RayService) is in ``docs/deploy.md``.

Two overlays: ``gpu`` (a head, the gateway pods, a CPU and a GPU worker group: the config as
written) and ``cpu`` (no GPU group; its ConfigMap holds the config with every model moved to
CPUs, ``on_cpu``: the same models on a cluster without GPUs). ``render`` is the base plus
the overlay's patches, the same patches ``deploy/k8s/overlays/*`` hold for kustomize
(``deploy.kustomize``).

    objects = render(load_config(Path("loom.yaml")), overlay="gpu", namespace="loom")
    print(to_yaml(objects))

What no cluster could run is refused with ``RenderError`` before anything is printed: a
model that asks for more CPUs or GPUs than a pod of its group holds, a gpu overlay nothing
would use, a key in clear in the config (it would land in a ConfigMap).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Literal

import yaml

from deploy import pods
from serving.config import EnsembleEntry, LoomConfig, ModelConfig, PoolConfig
from serving.config.cluster import GATEWAY_RESOURCE, ClusterConfig

Overlay = Literal["cpu", "gpu"]
OVERLAYS: tuple[Overlay, ...] = ("cpu", "gpu")
GATEWAY_GROUP = "gateway"
CPU_GROUP = "cpu"
GPU_GROUP = "gpu"
PROMETHEUS_NAMESPACE = "monitoring"
"""Where the Prometheus that scrapes the sidecars runs (the NetworkPolicy admits it)."""
LEASE_VERBS = ("get", "create", "update")
"""What ``training.k8s_leases`` calls: read, create and replace a Lease (a test reads the
calls out of the module and checks this list)."""


class RenderError(ValueError):
    """The config cannot run on the cluster it describes; the message names the field."""


@dataclass(frozen=True)
class Patch:
    """A JSON 6902 patch for kustomize: ``ops`` applied to the object ``kind``/``name``."""

    kind: str
    name: str
    ops: tuple[dict[str, Any], ...]


def labels(cluster: ClusterConfig, component: str | None = None) -> dict[str, str]:
    found = {
        "app.kubernetes.io/name": "loom",
        "app.kubernetes.io/part-of": "loom",
        "app.kubernetes.io/instance": cluster.name,
        "app.kubernetes.io/managed-by": "loom",
    }
    if component:
        found["app.kubernetes.io/component"] = component
    return found


def _meta(cluster: ClusterConfig, name: str, component: str | None = None) -> dict[str, Any]:
    return {"name": name, "labels": labels(cluster, component)}


def with_cluster(config: LoomConfig) -> LoomConfig:
    """``config`` with its ``cluster:`` section, the defaults' when it has none (written out
    in the ConfigMap, so the head reads what was rendered)."""
    if config.cluster is not None:
        return config
    return config.model_copy(update={"cluster": ClusterConfig()})


def config_text(config: LoomConfig) -> str:
    """The config as the ConfigMap holds it: what differs from the defaults, as YAML."""
    data = config.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False)


def on_cpu(config: LoomConfig) -> LoomConfig:
    """``config`` as the cpu overlay runs it: every model on CPUs (``num_gpus`` 0, ``device``
    cpu, ``dtype`` auto) and no GPUs for training: the same models on a cluster without GPUs
    (staging, CI). A config that asks for no GPU is returned as it is."""

    def on_gpus(m: ModelConfig | PoolConfig | EnsembleEntry) -> bool:
        if isinstance(m, EnsembleEntry):  # no replicas of its own
            return False
        return m.num_gpus > 0 or m.device.startswith("cuda") or bool(m.devices)

    if not any(on_gpus(m) for m in config.models) and not config.training.gpus:
        return config
    moved = {"num_gpus": 0.0, "device": "cpu", "dtype": "auto", "devices": None}
    models = tuple(m.model_copy(update=moved) if on_gpus(m) else m for m in config.models)
    training = config.training.model_copy(update={"gpus": None})
    return config.model_copy(update={"models": models, "training": training})


def default_overlay(config: LoomConfig) -> Overlay:
    """``gpu`` when a model's replicas ask for GPUs, else ``cpu``."""
    return "gpu" if any(m.num_gpus > 0 for m in config.deployed()) else "cpu"


def check(config: LoomConfig, overlay: Overlay) -> None:
    """``RenderError`` for what the cluster could not run (see the module's docstring)."""
    cluster = with_cluster(config).cluster
    assert cluster is not None
    server = config.server
    problems = []
    in_clear = [field for field in ("api_keys", "admin_api_keys") if getattr(server, field)]
    in_clear += [f"keys.{i}.key" for i, k in enumerate(server.keys) if k.key is not None]
    if in_clear:
        problems.append(
            f"server.{', server.'.join(in_clear)}: keys in clear would be written into a "
            "ConfigMap; create them with `loom keys create` and put keys.json in the Secret "
            f"{cluster.keys_secret} (docs/deploy.md), or give key_sha256"
        )
    if config.server.tls is not None:
        problems.append(
            "server.tls: certificate files are read on the gateway's node; terminate TLS at "
            "an Ingress on Kubernetes (docs/deploy.md) and leave server.tls out"
        )
    if overlay == "cpu":
        config = on_cpu(config)
    elif default_overlay(config) == "cpu" and not config.training.gpus:
        problems.append(
            "the gpu overlay reserves GPUs that nothing would use: no model sets num_gpus "
            "and training.gpus is unset; render the cpu overlay"
        )
    for m in config.deployed():
        if m.num_gpus == 0 and (m.device.startswith("cuda") or m.devices):
            problems.append(
                f"{m.name}: device {m.device} with num_gpus 0 would run on a CPU pod, which "
                "has no GPU: set num_gpus"
            )
        group = cluster.gpu_workers if m.num_gpus > 0 else cluster.cpu_workers
        where = "cluster.gpu_workers" if m.num_gpus > 0 else "cluster.cpu_workers"
        if m.num_cpus > group.cpus:
            problems.append(
                f"{m.name}: a replica needs {m.num_cpus} CPUs; a pod of {where} has {group.cpu}"
            )
        if m.num_gpus > cluster.gpu_workers.gpus:
            problems.append(
                f"{m.name}: a replica needs {m.num_gpus} GPUs; a pod of cluster.gpu_workers "
                f"has {cluster.gpu_workers.gpus}"
            )
    if problems:
        raise RenderError("cannot render: " + "; ".join(problems))


def _raycluster(config: LoomConfig, cluster: ClusterConfig) -> dict[str, Any]:
    gateway = cluster.gateway
    cpu = cluster.cpu_workers
    spec: dict[str, Any] = {
        "rayVersion": version("ray"),
        "enableInTreeAutoscaling": cluster.autoscaler.enabled,
        "autoscalerOptions": {
            "upscalingMode": cluster.autoscaler.upscaling_mode,
            "idleTimeoutSeconds": cluster.autoscaler.idle_timeout_s,
        },
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            # no replica on the head: it holds the GCS and the control plane only
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": pods.head_template(config, cluster),
        },
        "workerGroupSpecs": [
            {
                "groupName": GATEWAY_GROUP,
                "replicas": gateway.replicas,
                "minReplicas": gateway.replicas,
                "maxReplicas": gateway.replicas,
                # one gateway per pod (its port), and no model replica beside it
                "rayStartParams": {
                    "num-cpus": "0",
                    "resources": f'"{{\\"{GATEWAY_RESOURCE}\\": 1}}"',
                },
                "template": pods.gateway_template(config, cluster),
            },
            {
                "groupName": CPU_GROUP,
                "replicas": cpu.replicas,
                "minReplicas": cpu.min_replicas,
                "maxReplicas": cpu.max_replicas,
                "rayStartParams": {},  # num-cpus: KubeRay reads the container's limit
                "template": pods.worker_template(config, cluster, size=cpu),
            },
        ],
    }
    redis = config.ray.gcs_redis()
    if redis is not None:
        spec["gcsFaultToleranceOptions"] = {"redisAddress": redis.url()}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            **_meta(cluster, cluster.name),
            # the containers' commands are ours (the head runs `loom serve` after ray start)
            "annotations": {"ray.io/overwrite-container-cmd": "true"},
        },
        "spec": spec,
    }


def gpu_group(config: LoomConfig, cluster: ClusterConfig) -> dict[str, Any]:
    """The GPU worker group: the only pods that ask for GPUs."""
    gpu = cluster.gpu_workers
    template = pods.worker_template(
        config, cluster, size=gpu, gpus=gpu.gpus, gpu_resource=gpu.gpu_resource
    )
    template["spec"]["nodeSelector"] = dict(gpu.node_selector)
    template["spec"]["tolerations"] = [t.model_dump(exclude_none=True) for t in gpu.tolerations]
    return {
        "groupName": GPU_GROUP,
        "replicas": gpu.replicas,
        "minReplicas": gpu.min_replicas,
        "maxReplicas": gpu.max_replicas,
        "rayStartParams": {},  # num-gpus: KubeRay reads the container's limit
        "template": template,
    }


def _selector(cluster: ClusterConfig, **more: str) -> dict[str, str]:
    return {"ray.io/cluster": cluster.name, **more}


def base(config: LoomConfig) -> list[dict[str, Any]]:
    """Every object of the cpu overlay (the kustomize base), in apply order."""
    config = with_cluster(config)
    cluster = config.cluster
    assert cluster is not None
    name = cluster.name
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(cluster, name),
            "automountServiceAccountToken": False,
        },
    ]
    if config.control_plane.lease_backend == "kubernetes":
        objects += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": _meta(cluster, f"{name}-leases", "control-plane"),
                # exactly what the election calls (training.k8s_leases), on Leases only
                "rules": [
                    {
                        "apiGroups": ["coordination.k8s.io"],
                        "resources": ["leases"],
                        "verbs": list(LEASE_VERBS),
                    }
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": _meta(cluster, f"{name}-leases", "control-plane"),
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": f"{name}-leases",
                },
                "subjects": [{"kind": "ServiceAccount", "name": name}],
            },
        ]
    storage: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],  # every node reads the model store
        "resources": {"requests": {"storage": cluster.storage.size}},
    }
    if cluster.storage.class_name is not None:
        storage["storageClassName"] = cluster.storage.class_name
    objects += [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(cluster, pods.names(cluster)["config"]),
            "data": {"loom.yaml": config_text(config)},
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(cluster, pods.names(cluster)["home"]),
            "spec": storage,
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(cluster, f"{name}-gateway", "gateway"),
            "spec": {
                "type": "ClusterIP",
                "selector": _selector(cluster, **{"ray.io/group": GATEWAY_GROUP}),
                "ports": [
                    {"name": port_name, "port": number, "targetPort": port_name}
                    for port_name, number in pods.gateway_ports(config).items()
                ],
            },
        },
        _raycluster(config, cluster),
        _pdb(cluster, f"{name}-gateway", {"ray.io/group": GATEWAY_GROUP}, "In"),
        _pdb(cluster, f"{name}-workers", {"ray.io/group": GATEWAY_GROUP}, "NotIn"),
        *_network_policies(config, cluster),
        *_monitors(cluster),
    ]
    return objects


def _pdb(cluster: ClusterConfig, name: str, group: dict[str, str], op: str) -> dict[str, Any]:
    """At most one pod of the gateway (or of the model workers) drained at a time."""
    ((key, value),) = group.items()
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cluster, name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {
                "matchLabels": _selector(cluster, **{"ray.io/node-type": "worker"}),
                "matchExpressions": [{"key": key, "operator": op, "values": [value]}],
            },
        },
    }


def _network_policies(config: LoomConfig, cluster: ClusterConfig) -> list[dict[str, Any]]:
    """Policies add up: the cluster's pods reach each other on any port (Ray's ports stay
    inside), anyone reaches the gateway's ports (HTTP, and gRPC when set), Prometheus's
    namespace the metrics ports."""
    members = {"matchLabels": _selector(cluster)}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy"}
    return [
        {
            **policy,
            "metadata": _meta(cluster, f"{cluster.name}-internal"),
            "spec": {
                "podSelector": members,
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": members}]}],
            },
        },
        {
            **policy,
            "metadata": _meta(cluster, f"{cluster.name}-gateway", "gateway"),
            "spec": {
                "podSelector": {
                    "matchLabels": _selector(cluster, **{"ray.io/group": GATEWAY_GROUP})
                },
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "ports": [
                            {"protocol": "TCP", "port": number}
                            for number in pods.gateway_ports(config).values()
                        ]
                    }
                ],
            },
        },
        {
            **policy,
            "metadata": _meta(cluster, f"{cluster.name}-metrics"),
            "spec": {
                "podSelector": members,
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {
                                        "kubernetes.io/metadata.name": PROMETHEUS_NAMESPACE
                                    }
                                }
                            }
                        ],
                        "ports": [{"protocol": "TCP", "port": cluster.sidecar_port}],
                    }
                ],
            },
        },
    ]


def _monitors(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """Prometheus Operator: the sidecar of every worker pod, and each gateway pod."""
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": _meta(cluster, f"{cluster.name}-sidecars"),
            "spec": {
                "selector": {
                    "matchLabels": {
                        **_selector(cluster),
                        "app.kubernetes.io/component": "worker",
                    }
                },
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "5s"}],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": _meta(cluster, f"{cluster.name}-gateway", "gateway"),
            "spec": {
                "selector": {"matchLabels": labels(cluster, "gateway")},
                "endpoints": [{"port": "http", "path": "/metrics", "interval": "5s"}],
            },
        },
    ]


def patches(config: LoomConfig, overlay: Overlay) -> list[Patch]:
    """What ``overlay`` changes in the base: the gpu overlay adds the GPU worker group; the
    cpu overlay replaces the ConfigMap's config with ``on_cpu``'s, when that differs."""
    config = with_cluster(config)
    cluster = config.cluster
    assert cluster is not None
    if overlay == "cpu":
        cpu = on_cpu(config)
        if cpu == config:
            return []
        text = {"op": "replace", "path": "/data/loom.yaml", "value": config_text(cpu)}
        return [Patch("ConfigMap", pods.names(cluster)["config"], (text,))]
    group = gpu_group(config, cluster)
    add = {"op": "add", "path": "/spec/workerGroupSpecs/-", "value": group}
    return [Patch("RayCluster", cluster.name, (add,))]


def apply_patch(objects: list[dict[str, Any]], patch: Patch) -> None:
    """Apply ``patch`` in place, as kustomize would its ``add`` and ``replace`` ops (``-``
    appends to a list)."""
    target = next(
        o for o in objects if o["kind"] == patch.kind and o["metadata"]["name"] == patch.name
    )
    for op in patch.ops:
        if op["op"] not in ("add", "replace"):
            raise ValueError(f"only add and replace ops are rendered, not {op['op']}")
        *parents, last = op["path"].strip("/").split("/")
        node: Any = target
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list) and op["op"] == "add":
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif isinstance(node, list):
            node[int(last)] = copy.deepcopy(op["value"])
        else:
            node[last] = copy.deepcopy(op["value"])


def render(
    config: LoomConfig, *, overlay: Overlay = "cpu", namespace: str = "loom"
) -> list[dict[str, Any]]:
    """Every object ``config`` runs as on Kubernetes, in apply order, in ``namespace``;
    ``RenderError`` for a config the cluster could not run."""
    check(config, overlay)
    objects = base(config)
    for patch in patches(config, overlay):
        apply_patch(objects, patch)
    set_namespace(objects, namespace)
    return objects


def set_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    """Put every object, and every RoleBinding's subjects, in ``namespace`` (in place), as
    kustomize's ``namespace:`` does."""
    for obj in objects:
        obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config) as ``|`` blocks, readable in a diff."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def dump(obj: Any) -> str:
    """One object (or list) as YAML, keys in the order written."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """The objects as one YAML stream, ``---``-separated."""
    return "---\n".join(dump(o) for o in objects)
