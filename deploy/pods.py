"""The pod templates of Loom's RayCluster: the head (Ray's GCS and Loom's control plane), the
gateway pods, and the worker pods with their monitoring sidecar container.

Every pod runs the one Loom image as uid 1000 with no privilege, mounts the shared volume at
``$LOOM_HOME`` (the model store and job workspaces every node reads), and sets the Ray Serve
settings every Ray process needs at start (``SERVE_ENV``). KubeRay is told to keep the
containers' commands as written (``ray.io/overwrite-container-cmd``) and hands each the
``ray start`` it generated in ``$KUBERAY_GEN_RAY_START_CMD``:

- the head runs it without ``--block``, then ``exec loom serve --in-cluster``: the control
  plane is the head container's main process, so the pod is restarted when it dies;
- gateway and worker pods run it as it is (``--block``).

    head = head_template(config, cluster)
    workers = worker_template(config, cluster, group="cpu", gpus=0)
"""

from __future__ import annotations

from typing import Any

from serving.config import LoomConfig
from serving.config.cluster import ClusterConfig, PodSize
from serving.config.ray_head import SERVE_ENV

CONFIG_MOUNT = "/etc/loom"
CONFIG_FILE = f"{CONFIG_MOUNT}/loom.yaml"
KEYS_MOUNT = "/etc/loom-keys"
KEYS_FILE = f"{KEYS_MOUNT}/keys.json"
ULIMIT = "ulimit -n 65536"
"""Ray's advice for every Ray container (KubeRay adds it to the command it generates; with our
own command it is ours to add)."""
HEAD_COMMAND = (
    f"{ULIMIT}; ${{KUBERAY_GEN_RAY_START_CMD//--block/}} && exec loom serve --in-cluster "
    f"--address auto --config {CONFIG_FILE}"
)
WORKER_COMMAND = f"{ULIMIT}; exec $KUBERAY_GEN_RAY_START_CMD"
SIDECAR_RESOURCES = {"cpu": "100m", "memory": "256Mi"}
"""The sidecar reads a few small files and /proc once per scrape: 0.75 % of a MiniLM node's
CPU measured (docs/monitoring.md)."""
UID = 1000


def names(cluster: ClusterConfig) -> dict[str, str]:
    """The objects the pods refer to by name."""
    return {
        "config": f"{cluster.name}-config",
        "home": f"{cluster.name}-home",
        "account": cluster.name,
    }


def _resources(size: PodSize, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Requests = limits: Guaranteed QoS, and the CPU count KubeRay gives Ray (num-cpus)."""
    amounts = {"cpu": size.cpu, "memory": size.memory, **(extra or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": UID,
    }


def _pod_spec(cluster: ClusterConfig, containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "serviceAccountName": names(cluster)["account"],
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,  # the shared volume is written as the image's user
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": [
            {
                "name": "home",
                "persistentVolumeClaim": {"claimName": names(cluster)["home"]},
            },
            # Ray's object store lives in /dev/shm; a container's default is 64 MiB
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }


def _env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    env = [{"name": "LOOM_HOME", "value": cluster.home}]
    env += [{"name": key, "value": value} for key, value in SERVE_ENV.items()]
    return env


def _mounts(cluster: ClusterConfig) -> list[dict[str, Any]]:
    return [
        {"name": "home", "mountPath": cluster.home},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]


def _ray_container(
    cluster: ClusterConfig, name: str, command: str, size: PodSize, extra: dict[str, str]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "command": ["/bin/bash", "-lc", "--"],
        "args": [command],
        "env": _env(cluster),
        "resources": _resources(size, extra),
        "volumeMounts": _mounts(cluster),
        "securityContext": _container_security(),
    }


def head_template(config: LoomConfig, cluster: ClusterConfig) -> dict[str, Any]:
    """The head pod: Ray's GCS and autoscaler, and ``loom serve --in-cluster`` (the control
    plane: reconciler, scheduler, route board). It reads the config from the ConfigMap, the
    key digests from the keys Secret, ``LOOM_DB_URL`` from the database Secret. Its service
    account token is mounted only for what calls the API server from this pod: the election
    on Kubernetes Leases, and Ray's autoscaler (KubeRay's container beside the head)."""
    container = _ray_container(cluster, "ray-head", HEAD_COMMAND, cluster.head, {})
    container["env"] += [
        {"name": "LOOM_CONFIG", "value": CONFIG_FILE},
        {"name": "LOOM_KEYS_FILE", "value": KEYS_FILE},
        {
            "name": "LOOM_DB_URL",
            "valueFrom": {"secretKeyRef": {"name": cluster.database_secret, "key": "LOOM_DB_URL"}},
        },
    ]
    container["ports"] = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "metrics", "containerPort": 8080},
    ]
    container["volumeMounts"] += [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True},
    ]
    spec = _pod_spec(cluster, [container])
    calls_the_api = config.control_plane.lease_backend == "kubernetes" or cluster.autoscaler.enabled
    spec["automountServiceAccountToken"] = calls_the_api
    spec["volumes"] += [
        {"name": "config", "configMap": {"name": names(cluster)["config"]}},
        {
            "name": "keys",
            "secret": {
                "secretName": cluster.keys_secret,
                "items": [{"key": "keys.json", "path": "keys.json"}],
            },
        },
    ]
    return {"metadata": {"labels": {"app.kubernetes.io/component": "control-plane"}}, "spec": spec}


def _http_probe(config: LoomConfig, path: str, *, period_s: int, failures: int) -> dict[str, Any]:
    scheme = "HTTPS" if config.server.tls is not None else "HTTP"
    return {
        "httpGet": {"path": path, "port": "http", "scheme": scheme},
        "periodSeconds": period_s,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def gateway_ports(config: LoomConfig) -> dict[str, int]:
    """The ports a gateway pod serves, by name: ``http`` (``server.port``), and ``grpc``
    (``server.grpc_port``) when set."""
    server = config.server
    ports = {"http": server.port}
    if server.grpc_port is not None:
        ports["grpc"] = server.grpc_port
    return ports


def gateway_template(config: LoomConfig, cluster: ClusterConfig) -> dict[str, Any]:
    """A gateway pod: a Ray node with no CPUs for replicas and one ``loom_gateway``, where one
    gateway replica serves ``server.port`` and ``server.grpc_port`` (the Service's
    endpoints). Ready when the gateway says so (``/v2/health/ready``: its models can
    answer); restarted when it stops answering ``/v2/health/live``, after a startup
    allowance for the node to join and the replica to be placed."""
    container = _ray_container(cluster, "ray-worker", WORKER_COMMAND, cluster.gateway, {})
    container["ports"] = [
        {"name": name, "containerPort": port} for name, port in gateway_ports(config).items()
    ]
    container["startupProbe"] = _http_probe(config, "/v2/health/live", period_s=10, failures=60)
    container["livenessProbe"] = _http_probe(config, "/v2/health/live", period_s=10, failures=6)
    container["readinessProbe"] = _http_probe(config, "/v2/health/ready", period_s=5, failures=2)
    labels = {"app.kubernetes.io/component": "gateway"}
    return {"metadata": {"labels": labels}, "spec": _pod_spec(cluster, [container])}


def worker_template(
    config: LoomConfig,
    cluster: ClusterConfig,
    *,
    size: PodSize,
    gpus: int = 0,
    gpu_resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    """A worker pod: model replicas and training workers in its Ray node, and the monitoring
    sidecar as a native sidecar container (an init container that keeps running: started
    before Ray, stopped after it). Replicas write their stats to the pod's own ``stats``
    folder, which the sidecar reads; with GPUs the sidecar sees the node's GPUs through NVML
    without asking for one (``NVIDIA_VISIBLE_DEVICES=all``)."""
    extra = {gpu_resource: str(gpus)} if gpus else {}
    container = _ray_container(cluster, "ray-worker", WORKER_COMMAND, size, extra)
    stats = {"name": "stats", "mountPath": cluster.stats_dir}
    container["volumeMounts"].append(stats)
    sidecar_env = [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}] if gpus else []
    sidecar = {
        "name": "loom-sidecar",
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "restartPolicy": "Always",  # a native sidecar (Kubernetes >= 1.29)
        "command": ["python", "-m", "serving.monitoring.sidecar"],
        "args": [
            f"--stats-dir={cluster.stats_dir}",
            "--host=0.0.0.0",
            f"--port={cluster.sidecar_port}",
        ],
        "env": sidecar_env,
        "ports": [{"name": "metrics", "containerPort": cluster.sidecar_port}],
        "readinessProbe": {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "periodSeconds": 10,
        },
        "resources": {"requests": dict(SIDECAR_RESOURCES), "limits": dict(SIDECAR_RESOURCES)},
        "volumeMounts": [{**stats, "readOnly": False}],
        "securityContext": _container_security(),
    }
    spec = _pod_spec(cluster, [container])
    # the sidecar reads each replica's CPU and memory, and tells a killed replica's stale
    # file by its pid: it must see the Ray container's processes, with the same pids
    spec["shareProcessNamespace"] = True
    spec["initContainers"] = [sidecar]
    spec["volumes"].append({"name": "stats", "emptyDir": {}})
    labels = {"app.kubernetes.io/component": "worker"}
    return {"metadata": {"labels": labels}, "spec": spec}
