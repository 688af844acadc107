"""Apply Loom's rendered Kubernetes objects, wait for them, report on them, delete them.

    api = load_api_client()                                 # in a pod, else the kubeconfig
    apply(objects, api=api, progress=say)                   # server-side apply, in order
    wait_ready(api=api, namespace="ml", cluster="loom", timeout_s=600, progress=say)

``objects`` are plain manifests (``deploy.render``'s dicts), each written by server-side
apply: a PATCH of the whole object (``application/apply-patch+yaml``; JSON is YAML) to its
REST path with ``fieldManager=loom&force=true``. The server creates what is missing, updates
what differs, and ``force`` takes back fields another manager changed (a ``kubectl edit``):
the rendered objects are the source of truth.

REST paths come from ``RESOURCES``, a table of the kinds render produces, not from
``kubernetes.dynamic``, which asks the discovery endpoints (``/api``, ``/apis``, each group
version) before its first write: more round trips, a fake that must serve discovery, and a
missing CRD reported as its own discovery error. The table is pure and testable without a
server, and a missing CRD shows as the server's 404 on the write itself. The cost: a kind
render.py adds is added here too; an unknown kind is refused before anything is sent.

Failures are ``DeployError``s that say what to do: 404 on ``ray.io`` (KubeRay's CRDs are
missing, and the helm command that installs them), 403 (the verb, resource, namespace and
the ``kubectl auth can-i`` that checks it), no server ("no Kubernetes API at <host>"), 422
(the server's message). A 404 on ``monitoring.coreos.com`` (no Prometheus Operator) is only
a warning: the monitors come last, nothing depends on them, and a Prometheus that discovers
targets from the gateway (``deploy/monitoring/prometheus.yml``) still finds every one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError, MaxRetryError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
Manifests = Iterable[Mapping[str, Any]]  # rendered objects, as deploy.render returns them

APPLY_PATCH = "application/apply-patch+yaml"
REQUEST_TIMEOUT_S = 30.0
RAY_GROUP = "ray.io"
MONITORING_GROUP = "monitoring.coreos.com"
KUBERAY_INSTALL = (
    "helm repo add kuberay https://ray-project.github.io/kuberay-helm/ && helm install "
    "kuberay-operator kuberay/kuberay-operator -n ray-system --create-namespace"
)
PROMETHEUS_OPERATOR_INSTALL = (
    "helm repo add prometheus-community https://prometheus-community.github.io/helm-charts && "
    "helm install kube-prometheus-stack prometheus-community/kube-prometheus-stack"
)

# (API group, kind) -> URL plural, in apply order: identities and permissions before anything
# runs under them; config and the model store's claim before the pods that mount them;
# Services, disruption budgets and network policies before the pods they front or guard; the
# RayCluster (KubeRay starts pods the moment it exists); the optional monitors last.
RESOURCES: dict[tuple[str, str], str] = {
    ("", "ServiceAccount"): "serviceaccounts",
    ("rbac.authorization.k8s.io", "Role"): "roles",
    ("rbac.authorization.k8s.io", "RoleBinding"): "rolebindings",
    ("", "ConfigMap"): "configmaps",
    ("", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("", "Service"): "services",
    ("policy", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io", "NetworkPolicy"): "networkpolicies",
    (RAY_GROUP, "RayCluster"): "rayclusters",
    (MONITORING_GROUP, "PodMonitor"): "podmonitors",
    (MONITORING_GROUP, "ServiceMonitor"): "servicemonitors",
}
_RANK = {key: rank for rank, key in enumerate(RESOURCES)}


class DeployError(Exception):
    """A deploy step failed; ``str(error)`` is a message for the user, never a traceback."""


@dataclass(frozen=True, kw_only=True)
class ObjectRef:
    """Where one object lives in the API; ``name`` is "" for a whole collection."""

    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    namespace: str
    name: str

    @property
    def collection_path(self) -> str:
        """``/api/v1/namespaces/{ns}/{plural}`` or ``/apis/{group}/{version}/...``."""
        root = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{root}/namespaces/{quote(self.namespace, safe='')}/{self.plural}"

    @property
    def path(self) -> str:
        return f"{self.collection_path}/{quote(self.name, safe='')}"

    @property
    def resource(self) -> str:
        """As ``kubectl`` names it: ``configmaps``, ``roles.rbac.authorization.k8s.io``."""
        return self.plural if not self.group else f"{self.plural}.{self.group}"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def object_ref(obj: Mapping[str, Any]) -> ObjectRef:
    """Where ``obj`` is written; ``DeployError`` for a kind not in ``RESOURCES`` or an object
    without apiVersion, kind, metadata.name or metadata.namespace."""
    metadata = obj.get("metadata") or {}
    api_version = _text(obj.get("apiVersion"), "apiVersion", obj)
    kind = _text(obj.get("kind"), "kind", obj)
    name = _text(metadata.get("name"), "metadata.name", obj)
    namespace = _text(metadata.get("namespace"), "metadata.namespace", obj)
    group, _, version = api_version.rpartition("/")
    plural = RESOURCES.get((group, kind))
    if plural is None:
        known = ", ".join(f"{k} ({g or 'v1'})" for g, k in RESOURCES)
        raise DeployError(f"cannot apply {kind} ({api_version}): deploy/apply.py knows {known}")
    return ObjectRef(
        kind=kind, group=group, version=version, plural=plural, namespace=namespace, name=name
    )


def apply_order(objects: Manifests) -> list[Mapping[str, Any]]:
    """``objects`` in the order ``apply`` writes them (``RESOURCES``'s order; render's order
    within a kind); ``DeployError`` for any object ``object_ref`` refuses."""
    return [obj for _, obj in _ordered(objects)]


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """A client for the API server this process can reach: with neither argument, the pod's
    service account when running in a cluster; else the kubeconfig at ``kubeconfig``, or
    ``$KUBECONFIG`` (read at this call), or ``~/.kube/config``, at its ``context`` or its
    current one. The configuration is the client's own; the library's default is untouched.
    Close it when done (it is a context manager). ``DeployError("no kubeconfig: ...")`` when
    there is none to read."""
    configuration = client.Configuration()
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return ApiClient(configuration)
        except config.ConfigException:
            pass  # not in a pod
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    if not any(os.path.isfile(os.path.expanduser(p)) for p in path.split(os.pathsep) if p):
        raise DeployError(
            f"no kubeconfig: {path} does not exist. Point KUBECONFIG (or --kubeconfig) at "
            "one, write one with your cluster's tool (`aws eks update-kubeconfig`, `gcloud "
            "container clusters get-credentials`, `kind export kubeconfig`), or run in a pod"
        )
    try:
        config.load_kube_config(
            config_file=path, context=context, client_configuration=configuration
        )
    except config.ConfigException as exc:
        raise DeployError(f"kubeconfig {path}: {exc}") from exc
    return ApiClient(configuration)


def apply(
    objects: Manifests, *, api: ApiClient, progress: Progress, field_manager: str = "loom"
) -> None:
    """Server-side apply each object, in ``apply_order``, one line to ``progress`` per object.
    Stops at the first failure with a ``DeployError``: what came before stays applied, nothing
    after is sent (applying again resumes: SSA is idempotent). Monitors are skipped with a
    warning line when the Prometheus Operator's CRDs are not installed."""
    query = [("fieldManager", field_manager), ("force", "true")]
    monitors_missing = False
    for ref, obj in _ordered(objects):
        if ref.group == MONITORING_GROUP and monitors_missing:
            progress(f"skipped {ref}: no Prometheus Operator")
            continue
        answer = _send(api, "PATCH", ref.path, query, json.dumps(obj), APPLY_PATCH)
        if answer.status == 404 and ref.group == MONITORING_GROUP and not answer.names_namespace:
            warning = (
                f"warning: skipped {ref}: the Prometheus Operator's CRDs are not installed, so "
                "Prometheus will not discover Loom by PodMonitor/ServiceMonitor; install them "
                f"with `{PROMETHEUS_OPERATOR_INSTALL}`, or discover targets from the gateway "
                "(deploy/monitoring/prometheus.yml)"
            )
            logger.warning(warning)
            progress(warning)
            monitors_missing = True
            continue
        _check(api, answer, ref, verb="patch")
        progress(f"{'created' if answer.status == 201 else 'applied'} {ref}")


def delete(
    objects: Manifests, *, api: ApiClient, progress: Progress, keep_volume: bool = True
) -> None:
    """Delete each object in reverse ``apply_order`` (the RayCluster before what its pods use),
    with ``propagationPolicy=Foreground``: an object stays, marked for deletion, until its
    dependents are gone; this returns once the API server has accepted each deletion. An
    object already gone (404) is reported and passed over. The PersistentVolumeClaim (the
    model store's data) is kept unless ``keep_volume=False``, and ``progress`` says so."""
    for ref, _ in reversed(_ordered(objects)):
        if ref.kind == "PersistentVolumeClaim" and keep_volume:
            progress(f"kept {ref}: it holds the model store and job workspaces (--delete-volume)")
            continue
        answer = _send(api, "DELETE", ref.path, [("propagationPolicy", "Foreground")])
        if answer.status == 404:
            progress(f"{ref} already gone")
            continue
        _check(api, answer, ref, verb="delete")
        progress(f"deleting {ref}")


@dataclass(frozen=True, kw_only=True)
class GroupStatus:
    """Pods of one group: ``desired_pods`` from the spec, ``ready_pods`` counted (Ready=True,
    not terminating)."""

    name: str
    desired_pods: int
    ready_pods: int


@dataclass(frozen=True, kw_only=True)
class ClusterStatus:
    """A RayCluster as the API reports it (``cluster_status``); ``format_status`` shows it.

        status = cluster_status(api=api, namespace="ml", cluster="loom")
        status.state, status.gateway.ready_pods       # "ready", 2
        print(format_status(status))

    ``desired_pods`` and ``ready_pods`` count the head and every worker group.
    """

    namespace: str
    cluster: str
    state: str  # KubeRay's status.state: "" until it reports one, then "ready", "suspended"...
    head_phase: str  # the head pod's status.phase ("Pending", "Running"); "" with no head pod
    head_ready: bool
    worker_groups: tuple[GroupStatus, ...]
    gateway: GroupStatus

    @property
    def desired_pods(self) -> int:
        return 1 + sum(group.desired_pods for group in self.worker_groups)

    @property
    def ready_pods(self) -> int:
        return int(self.head_ready) + sum(group.ready_pods for group in self.worker_groups)


def cluster_status(
    *, api: ApiClient, namespace: str, cluster: str, gateway_group: str = "gateway"
) -> ClusterStatus:
    """The RayCluster ``cluster`` and its pods (label ``ray.io/cluster=<cluster>``), read
    now: two GETs. ``DeployError`` when it does not exist or cannot be read."""
    ref = ObjectRef(
        kind="RayCluster", group=RAY_GROUP, version="v1", plural="rayclusters",
        namespace=namespace, name=cluster,
    )  # fmt: skip
    answer = _send(api, "GET", ref.path)
    _check(api, answer, ref, verb="get")
    pods = ObjectRef(
        kind="Pod", group="", version="v1", plural="pods", namespace=namespace, name=""
    )
    listed = _send(
        api, "GET", pods.collection_path, [("labelSelector", f"ray.io/cluster={cluster}")]
    )
    _check(api, listed, pods, verb="list")
    return read_cluster_status(answer.body, listed.body.get("items") or [], gateway_group)


def read_cluster_status(
    raycluster: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], gateway_group: str
) -> ClusterStatus:
    """``ClusterStatus`` from a RayCluster object and its pods. KubeRay v1 reports worker
    totals only, so a group's desired pods come from its spec: ``replicas`` x ``numOfHosts``,
    0 while the cluster or the group is suspended."""
    spec, metadata = raycluster.get("spec") or {}, raycluster.get("metadata") or {}
    seen: Counter[str] = Counter()
    ready: Counter[str] = Counter()
    head: Mapping[str, Any] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        head = pod if labels.get("ray.io/node-type") == "head" else head
        seen[labels.get("ray.io/group", "")] += 1
        ready[labels.get("ray.io/group", "")] += _pod_ready(pod)
    workers = tuple(
        GroupStatus(
            name=group["groupName"],
            desired_pods=0
            if spec.get("suspend") or group.get("suspend")
            else int(group.get("replicas", 0)) * int(group.get("numOfHosts", 1)),
            ready_pods=ready[group["groupName"]],
        )
        for group in spec.get("workerGroupSpecs") or []
    )
    # a gateway outside the worker groups has no desired count: what is there is desired
    outside = GroupStatus(
        name=gateway_group, desired_pods=seen[gateway_group], ready_pods=ready[gateway_group]
    )
    return ClusterStatus(
        namespace=metadata.get("namespace", ""),
        cluster=metadata.get("name", ""),
        state=(raycluster.get("status") or {}).get("state") or "",
        head_phase=(head.get("status") or {}).get("phase", ""),
        head_ready=bool(head) and _pod_ready(head),
        worker_groups=workers,
        gateway=next((g for g in workers if g.name == gateway_group), outside),
    )


def format_status(status: ClusterStatus) -> str:
    """A small aligned table: the cluster's state, then one row per group of pods.

        RayCluster ml/loom: ready
        GROUP    DESIRED  READY  HEAD
        head           1      1  Running
        gateway        2      2
        cpu            1      1

    The gateway gets a row of its own when it is not one of the worker groups."""
    rows = [("GROUP", "DESIRED", "READY", "HEAD")]
    rows.append(("head", "1", str(int(status.head_ready)), status.head_phase or "none"))
    groups = list(status.worker_groups)
    if status.gateway not in groups:
        groups.append(status.gateway)
    rows += [(g.name, str(g.desired_pods), str(g.ready_pods), "") for g in groups]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"RayCluster {status.namespace}/{status.cluster}: {status.state or 'no state yet'}"]
    for name, desired, ready, head in rows:
        line = f"{name:<{widths[0]}}  {desired:>{widths[1]}}  {ready:>{widths[2]}}  {head}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def wait_ready(
    *,
    api: ApiClient,
    namespace: str,
    cluster: str,
    gateway_group: str = "gateway",
    timeout_s: float,
    progress: Progress,
    poll_s: float = 2.0,
) -> None:
    """Poll every ``poll_s`` until the RayCluster's ``status.state`` is "ready" (KubeRay v1)
    and at least one ``gateway_group`` pod is Ready, with a line to ``progress`` whenever
    what the API reports changes. ``DeployError`` naming what is not ready once ``timeout_s``
    has passed."""
    deadline_s = time.monotonic() + timeout_s
    said: dict[str, str] = {}
    while True:
        status = cluster_status(
            api=api, namespace=namespace, cluster=cluster, gateway_group=gateway_group
        )
        lines = {
            "cluster": f"raycluster {cluster}: state {status.state or 'none yet'}, "
            f"{status.ready_pods}/{status.desired_pods} pods ready",
            "gateway": f"{gateway_group}: {status.gateway.ready_pods}/"
            f"{status.gateway.desired_pods} ready",
        }
        for subject, line in lines.items():
            if said.get(subject) != line:
                progress(line)
                said[subject] = line
        waiting = not_ready(status)
        if not waiting:
            return
        remaining_s = deadline_s - time.monotonic()
        if remaining_s <= 0:
            raise DeployError(f"not ready after {timeout_s:g} s: {'; '.join(waiting)}")
        time.sleep(min(poll_s, remaining_s))


def not_ready(status: ClusterStatus) -> list[str]:
    """What keeps ``status`` from ready, one phrase each; empty when it is ready."""
    waiting = []
    if status.state != "ready":
        unset = "" if status.state else ", KubeRay has not reported on it: is its operator running?"
        waiting.append(
            f"raycluster {status.cluster} state is {status.state or 'unset'!r}, not 'ready' "
            f"({status.ready_pods}/{status.desired_pods} pods ready{unset})"
        )
    if status.gateway.ready_pods < 1:
        waiting.append(
            f"no {status.gateway.name} pod is Ready "
            f"(0/{status.gateway.desired_pods}; kubectl get pods -n {status.namespace} "
            f"-l ray.io/group={status.gateway.name})"
        )
    return waiting


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    body: dict[str, Any]

    @property
    def message(self) -> str:
        return str(self.body.get("message") or self.reason)

    @property
    def names_namespace(self) -> bool:
        """A 404 about the namespace (details.kind "namespaces"), not the resource."""
        return (self.body.get("details") or {}).get("kind") == "namespaces"


def _ordered(objects: Manifests) -> list[tuple[ObjectRef, Mapping[str, Any]]]:
    refs = [(object_ref(obj), obj) for obj in objects]  # all checked before any is sent
    return sorted(refs, key=lambda pair: _RANK[(pair[0].group, pair[0].kind)])


def _send(
    api: ApiClient,
    method: str,
    path: str,
    query: Sequence[tuple[str, str]] = (),
    body: str | None = None,
    content_type: str | None = None,
) -> _Answer:
    """One request, with the client's credentials; any status is returned, not raised.
    ``DeployError`` when no answer comes."""
    headers = {"Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = api.param_serialize(
        method=method, resource_path=path, query_params=list(query), header_params=headers,
        body=body, auth_settings=["BearerToken"],
    )  # fmt: skip
    host = api.configuration.host
    try:
        response = api.call_api(*request, _request_timeout=REQUEST_TIMEOUT_S)
        raw: bytes = response.read()
    except MaxRetryError as exc:
        raise DeployError(f"no Kubernetes API at {host}: {exc.reason}") from exc
    except (HTTPError, ApiException) as exc:  # a timeout, a dropped connection, TLS
        raise DeployError(f"no Kubernetes API at {host}: {exc}") from exc
    logger.debug("%s %s -> %d", method, path, response.status)
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:  # a proxy's HTML page, say
        parsed = {"message": raw[:200].decode(errors="replace")}
    return _Answer(
        response.status, response.reason or "", parsed if isinstance(parsed, dict) else {}
    )


def _check(api: ApiClient, answer: _Answer, ref: ObjectRef, *, verb: str) -> None:
    """Return on a 2xx; else raise the ``DeployError`` that says what to do about it."""
    if 200 <= answer.status < 300:
        return
    host, status, message = api.configuration.host, answer.status, answer.message
    if status == 401:
        raise DeployError(
            f"the API server at {host} refused the credentials (401 Unauthorized): log in "
            "again or refresh the kubeconfig's token"
        )
    if status == 403:
        raise DeployError(
            f"forbidden: cannot {verb} {ref.resource} in namespace {ref.namespace} ({message}); "
            f"check with `kubectl auth can-i {verb} {ref.resource} -n {ref.namespace}`"
        )
    if status == 404 and answer.names_namespace:
        raise DeployError(
            f"namespace {ref.namespace} does not exist: `kubectl create namespace {ref.namespace}`"
        )
    if status == 404 and (answer.body.get("details") or {}).get("name") == ref.name:
        raise DeployError(f"no {ref}: nothing is deployed under that name")
    if status == 404 and ref.group == RAY_GROUP:
        raise DeployError(
            f"{host} serves no {ref.resource}/{ref.version}: the KubeRay operator's CRDs are "
            f"not installed; install the operator, which brings them: `{KUBERAY_INSTALL}`"
        )
    if status == 422:
        raise DeployError(f"the API server refused {ref} (422 Invalid): {message}")
    raise DeployError(f"{verb} {ref}: the API server at {host} answered {status}: {message}")


def _text(value: object, field: str, obj: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or not value:
        raise DeployError(f"a rendered object has no {field}: {json.dumps(obj)[:200]}...")
    return value


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    """Condition Ready=True and not terminating (a pod being deleted can still read Ready)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
