"""``deploy.apply`` against a FAKE Kubernetes API server: not Kubernetes, not a cluster.

``FakeKubernetes`` is a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a thread. It
records every request (method, path, query, content type, authorization, body) and answers
the few calls ``deploy.apply`` makes the way the API server does: a server-side apply PATCH
stores the object and echoes it back with ``metadata.uid`` and ``resourceVersion`` (201 when
it created it, 200 after); a GET of a stored object returns it, a RayCluster with
``status.state`` "" until its n-th GET and "ready" from then on; a GET of ``pods`` with a
``labelSelector`` returns a PodList of the matching pods; a DELETE removes the object (404
when there is none). Errors are ``Status`` objects, as Kubernetes writes them; a test makes
any path fail with ``fail(fragment, code, reason)``. The client is the real ``kubernetes``
``ApiClient``, pointed at the fake with ``Configuration(host=...)`` and no credentials.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes.client import ApiClient, Configuration

from deploy.apply import (
    ClusterStatus,
    DeployError,
    GroupStatus,
    apply,
    apply_order,
    cluster_status,
    delete,
    format_status,
    load_api_client,
    wait_ready,
)

NS = "ml"
LABELS = {"app.kubernetes.io/part-of": "loom", "app.kubernetes.io/instance": "loom"}


def meta(name: str) -> dict[str, Any]:
    return {"name": name, "namespace": NS, "labels": dict(LABELS)}


CONFIGMAP: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": meta("loom-config"),
    "data": {"loom.yaml": "models: []\n"},
}
ROLE: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": meta("loom"),
    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
}
PVC: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "PersistentVolumeClaim",
    "metadata": meta("loom-models"),
    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}},
}
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": meta("loom-gateway"),
    "spec": {"selector": {"ray.io/group": "gateway"}, "ports": [{"port": 8000}]},
}
RAYCLUSTER: dict[str, Any] = {
    "apiVersion": "ray.io/v1",
    "kind": "RayCluster",
    "metadata": meta("loom"),
    "spec": {
        "headGroupSpec": {"rayStartParams": {}},
        "workerGroupSpecs": [
            {"groupName": "gateway", "replicas": 2},
            {"groupName": "cpu", "replicas": 1},
        ],
    },
}
PODMONITOR: dict[str, Any] = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PodMonitor",
    "metadata": meta("loom"),
    "spec": {"podMetricsEndpoints": [{"port": "metrics"}]},
}
SERVICEMONITOR: dict[str, Any] = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "ServiceMonitor",
    "metadata": meta("loom"),
    "spec": {"endpoints": [{"port": "http"}]},
}

# render's order is its own; apply's is RBAC, config, claim, services, RayCluster, monitors
RENDERED: list[dict[str, Any]] = [PODMONITOR, RAYCLUSTER, SERVICE, CONFIGMAP, PVC, ROLE]
APPLY_PATHS = [
    f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/loom",
    f"/api/v1/namespaces/{NS}/configmaps/loom-config",
    f"/api/v1/namespaces/{NS}/persistentvolumeclaims/loom-models",
    f"/api/v1/namespaces/{NS}/services/loom-gateway",
    f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/loom",
    f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/podmonitors/loom",
]
RAYCLUSTER_PATH = APPLY_PATHS[4]


@dataclass(frozen=True)
class Seen:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    authorization: str
    body: Any


@dataclass(frozen=True)
class FakePod:
    """A pod the fake lists: Ready (and Running) from the RayCluster's ``ready_from_get``-th
    GET on; never when None."""

    name: str
    group: str
    ready_from_get: int | None
    head: bool = False
    cluster: str = "loom"


def status_object(code: int, reason: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }


@dataclass
class FakeKubernetes:
    """The fake API server's state (see the module docstring)."""

    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, tuple[int, str, str, dict[str, Any]]] = field(default_factory=dict)
    pods: list[FakePod] = field(default_factory=list)
    cluster_ready_from_get: int | None = 1
    raycluster_gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(
        self, fragment: str, code: int, reason: str, message: str = "", **details: Any
    ) -> None:
        """Every request whose path contains ``fragment`` answers this Status."""
        self.failures[fragment] = (code, reason, message or reason, details)

    def paths(self, method: str) -> list[str]:
        return [seen.path for seen in self.requests if seen.method == method]

    def answer(self, seen: Seen) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append(seen)
            for fragment, (code, reason, message, details) in self.failures.items():
                if fragment in seen.path:
                    return code, status_object(code, reason, message, details)
            return getattr(self, f"_{seen.method.lower()}")(seen)

    def _patch(self, seen: Seen) -> tuple[int, dict[str, Any]]:
        if seen.content_type != "application/apply-patch+yaml":
            return 415, status_object(415, "UnsupportedMediaType", seen.content_type, {})
        created = seen.path not in self.objects
        stored = copy.deepcopy(seen.body)
        stored["metadata"]["uid"] = f"uid-{len(self.objects)}"
        stored["metadata"]["resourceVersion"] = str(len(self.requests))
        self.objects[seen.path] = stored
        return (201 if created else 200), stored

    def _get(self, seen: Seen) -> tuple[int, dict[str, Any]]:
        if seen.path == f"/api/v1/namespaces/{NS}/pods":
            wanted = dict(term.split("=") for term in seen.query["labelSelector"][0].split(","))
            items = [self._pod(pod) for pod in self.pods]
            items = [pod for pod in items if wanted.items() <= pod["metadata"]["labels"].items()]
            return 200, {"kind": "PodList", "apiVersion": "v1", "items": items}
        if seen.path not in self.objects:
            name = seen.path.rsplit("/", 1)[1]
            return 404, status_object(404, "NotFound", f'"{name}" not found', {"name": name})
        answer = copy.deepcopy(self.objects[seen.path])
        if seen.path == RAYCLUSTER_PATH:
            self.raycluster_gets += 1
            ready = self._reached(self.cluster_ready_from_get)
            answer["status"] = {"state": "ready" if ready else ""}
        return 200, answer

    def _delete(self, seen: Seen) -> tuple[int, dict[str, Any]]:
        gone = self.objects.pop(seen.path, None)
        if gone is None:
            name = seen.path.rsplit("/", 1)[1]
            return 404, status_object(404, "NotFound", f'"{name}" not found', {"name": name})
        gone["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
        return 200, gone

    def _reached(self, from_get: int | None) -> bool:
        return from_get is not None and self.raycluster_gets >= from_get

    def _pod(self, pod: FakePod) -> dict[str, Any]:
        ready = self._reached(pod.ready_from_get)
        labels = {
            "ray.io/cluster": pod.cluster,
            "ray.io/group": pod.group,
            "ray.io/node-type": "head" if pod.head else "worker",
        }
        return {
            "metadata": {"name": pod.name, "namespace": NS, "labels": labels},
            "status": {
                "phase": "Running" if ready else "Pending",
                "conditions": [{"type": "Ready", "status": str(ready)}],
            },
        }


class _Handler(BaseHTTPRequestHandler):
    server: _FakeServer

    def _serve(self) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        seen = Seen(
            method=self.command,
            path=url.path,
            query=parse_qs(url.query),
            content_type=self.headers.get("Content-Type", ""),
            authorization=self.headers.get("Authorization", ""),
            body=json.loads(raw) if raw else None,
        )
        code, answer = self.server.fake.answer(seen)
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test reads fake.requests, not stderr


class _FakeServer(ThreadingHTTPServer):
    def __init__(self, fake: FakeKubernetes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()
    server = _FakeServer(fake)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def api(fake: FakeKubernetes) -> Iterator[ApiClient]:
    client = ApiClient(Configuration(host=fake.url))
    yield client
    client.close()


def kubeconfig_for(fake: FakeKubernetes, path: Path) -> str:
    context = {"name": "fake", "context": {"cluster": "fake", "user": "ci"}}
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "users": [{"name": "ci", "user": {"token": "t0ken"}}],
                "contexts": [context],
            }
        )
    )
    return str(path)


def loom_pods(*, gateway_b_ready_from: int | None = None) -> list[FakePod]:
    """A head, two gateway pods and one cpu worker of ``loom``, and a pod of another cluster
    that the label selector must leave out."""
    return [
        FakePod("loom-head", "headgroup", ready_from_get=1, head=True),
        FakePod("loom-gateway-a", "gateway", ready_from_get=3),
        FakePod("loom-gateway-b", "gateway", ready_from_get=gateway_b_ready_from),
        FakePod("loom-cpu-a", "cpu", ready_from_get=2),
        FakePod("other-gateway", "gateway", ready_from_get=1, cluster="other"),
    ]


def test_apply_sends_every_object_as_a_server_side_apply_in_dependency_order(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    lines: list[str] = []
    apply(RENDERED, api=api, progress=lines.append)

    assert [seen.path for seen in fake.requests] == APPLY_PATHS  # RBAC first, monitors last
    by_path = {APPLY_PATHS[i]: obj for i, obj in enumerate(apply_order(RENDERED))}
    for seen in fake.requests:
        assert seen.method == "PATCH"
        assert seen.query == {"fieldManager": ["loom"], "force": ["true"]}
        assert seen.content_type == "application/apply-patch+yaml"
        assert seen.body == by_path[seen.path]  # the whole object, as rendered
    assert lines[0] == f"created Role {NS}/loom"
    assert all(line.startswith("created ") for line in lines)

    apply(RENDERED, api=api, progress=lines.append)  # again: the server has them all
    assert lines[6:] == [line.replace("created", "applied") for line in lines[:6]]


def test_wait_ready_returns_once_the_cluster_is_ready_and_a_gateway_pod_is_ready(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    apply(RENDERED, api=api, progress=lambda line: None)
    fake.pods = loom_pods()
    fake.cluster_ready_from_get = 3
    lines: list[str] = []

    # 10 s is a bound on a broken fake, not a timing under test: it is ready on the 3rd poll
    wait_ready(
        api=api, namespace=NS, cluster="loom", timeout_s=10, poll_s=0.01, progress=lines.append
    )

    assert fake.raycluster_gets == 3  # returned on the poll that saw ready, no later
    # desired: 1 head + 2 gateway + 1 cpu = 4; a line only when what is seen changes
    assert lines == [
        "raycluster loom: state none yet, 1/4 pods ready",  # poll 1: the head
        "gateway: 0/2 ready",
        "raycluster loom: state none yet, 2/4 pods ready",  # poll 2: + cpu; gateway unchanged
        "raycluster loom: state ready, 3/4 pods ready",  # poll 3: + gateway-a
        "gateway: 1/2 ready",
    ]


def test_a_missing_kuberay_crd_stops_apply_with_how_to_install_it(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    fake.fail("/apis/ray.io/", 404, "NotFound", "the server could not find the requested resource")

    with pytest.raises(DeployError, match="KubeRay operator's CRDs are not installed") as caught:
        apply(RENDERED, api=api, progress=lambda line: None)

    assert "helm install kuberay-operator kuberay/kuberay-operator" in str(caught.value)
    assert fake.paths("PATCH") == APPLY_PATHS[:5]  # the RayCluster was the last one sent


def test_a_forbidden_role_names_the_verb_resource_namespace_and_the_check(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    fake.fail("/roles/", 403, "Forbidden", 'roles.rbac.authorization.k8s.io "loom" is forbidden')

    with pytest.raises(DeployError) as caught:
        apply(RENDERED, api=api, progress=lambda line: None)

    message = str(caught.value)
    assert "cannot patch roles.rbac.authorization.k8s.io in namespace ml" in message
    assert "kubectl auth can-i patch roles.rbac.authorization.k8s.io -n ml" in message
    assert fake.paths("PATCH") == APPLY_PATHS[:1]  # nothing after the Role


def test_a_missing_namespace_says_to_create_it(fake: FakeKubernetes, api: ApiClient) -> None:
    fake.fail(
        f"/namespaces/{NS}/",
        404,
        "NotFound",
        'namespaces "ml" not found',
        name=NS,
        kind="namespaces",
    )

    with pytest.raises(DeployError, match="namespace ml does not exist: `kubectl create"):
        apply(RENDERED, api=api, progress=lambda line: None)


def test_an_invalid_object_carries_the_servers_message(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    why = 'Service "loom-gateway" is invalid: spec.ports[0].port: Invalid value: 0'
    fake.fail("/services/", 422, "Invalid", why)

    with pytest.raises(DeployError, match="422") as caught:
        apply(RENDERED, api=api, progress=lambda line: None)

    assert why in str(caught.value)


def test_missing_prometheus_operator_skips_the_monitors_with_a_warning(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    fake.fail("/apis/monitoring.coreos.com/", 404, "NotFound", "could not find the resource")
    lines: list[str] = []

    apply([*RENDERED, SERVICEMONITOR], api=api, progress=lines.append)

    assert RAYCLUSTER_PATH in fake.objects  # the rest is applied
    assert fake.paths("PATCH") == APPLY_PATHS  # the ServiceMonitor is not even tried
    assert lines[-2].startswith(f"warning: skipped PodMonitor {NS}/loom: the Prometheus Oper")
    assert lines[-1] == f"skipped ServiceMonitor {NS}/loom: no Prometheus Operator"


def test_an_unknown_kind_is_refused_before_anything_is_sent(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("x")}

    with pytest.raises(DeployError, match=r"cannot apply Deployment \(apps/v1\)"):
        apply([*RENDERED, deployment], api=api, progress=lambda line: None)

    assert fake.requests == []


def test_no_api_server_is_no_kubernetes_api_at_the_host() -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    with (
        ApiClient(Configuration(host=host)) as closed,
        pytest.raises(DeployError, match=f"no Kubernetes API at {host}"),
    ):
        apply([CONFIGMAP], api=closed, progress=lambda line: None)


def test_no_kubeconfig_and_no_pod_is_a_deploy_error_saying_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))

    with pytest.raises(DeployError, match="no kubeconfig: .*missing does not exist.*KUBECONFIG"):
        load_api_client()
    with pytest.raises(DeployError, match="no kubeconfig"):
        load_api_client(kubeconfig=str(tmp_path / "also-missing"))


def test_a_kubeconfig_names_the_server_and_its_token_reaches_it(
    fake: FakeKubernetes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", kubeconfig_for(fake, tmp_path / "config"))

    with load_api_client() as api:
        apply([CONFIGMAP], api=api, progress=lambda line: None)

    assert [seen.authorization for seen in fake.requests] == ["Bearer t0ken"]


def test_wait_ready_times_out_naming_what_is_not_ready(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    apply(RENDERED, api=api, progress=lambda line: None)
    fake.pods = [
        FakePod("loom-head", "headgroup", ready_from_get=1, head=True),
        FakePod("loom-gateway-a", "gateway", ready_from_get=None),
    ]
    fake.cluster_ready_from_get = 1  # the cluster reads ready; no gateway pod ever does

    # 0.2 s bounds the wait; nothing here depends on how long it takes
    with pytest.raises(DeployError, match="not ready after 0.2 s") as caught:
        wait_ready(
            api=api,
            namespace=NS,
            cluster="loom",
            timeout_s=0.2,
            poll_s=0.01,
            progress=lambda line: None,
        )

    message = str(caught.value)
    assert "no gateway pod is Ready (0/2;" in message
    assert "raycluster loom state" not in message  # it was ready: not named
    assert fake.raycluster_gets >= 2  # it polled, not one look and give up

    fake.cluster_ready_from_get = None
    with pytest.raises(DeployError, match="raycluster loom state is 'unset', not 'ready'"):
        wait_ready(
            api=api,
            namespace=NS,
            cluster="loom",
            timeout_s=0.05,
            poll_s=0.01,
            progress=lambda line: None,
        )


def test_delete_goes_in_reverse_order_ignores_404_and_keeps_the_volume(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    apply(RENDERED, api=api, progress=lambda line: None)
    del fake.objects[APPLY_PATHS[3]]  # the Service is gone already
    lines: list[str] = []

    delete(RENDERED, api=api, progress=lines.append)

    pvc_path = APPLY_PATHS[2]
    assert fake.paths("DELETE") == [p for p in reversed(APPLY_PATHS) if p != pvc_path]
    deletes = [seen for seen in fake.requests if seen.method == "DELETE"]
    assert all(seen.query == {"propagationPolicy": ["Foreground"]} for seen in deletes)
    assert list(fake.objects) == [pvc_path]  # the model store's claim stays
    assert f"Service {NS}/loom-gateway already gone" in lines
    kept = f"kept PersistentVolumeClaim {NS}/loom-models: it holds the model store"
    assert f"{kept} and job workspaces (--delete-volume)" in lines

    delete(RENDERED, api=api, progress=lines.append, keep_volume=False)
    assert fake.objects == {}
    assert lines[-1] == f"Role {NS}/loom already gone"


def test_cluster_status_and_its_table_from_the_apis_answers(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    apply([RAYCLUSTER], api=api, progress=lambda line: None)
    fake.pods = loom_pods()
    fake.raycluster_gets = 2  # the next GET is the 3rd: ready; gateway-a, cpu-a, head Ready

    status = cluster_status(api=api, namespace=NS, cluster="loom")

    gateway = GroupStatus(name="gateway", desired_pods=2, ready_pods=1)  # b is Pending
    assert status == ClusterStatus(
        namespace=NS,
        cluster="loom",
        state="ready",
        head_phase="Running",
        head_ready=True,
        worker_groups=(gateway, GroupStatus(name="cpu", desired_pods=1, ready_pods=1)),
        gateway=gateway,
    )
    assert (status.ready_pods, status.desired_pods) == (3, 4)  # head + 1 gateway + 1 cpu of 4
    assert format_status(status) == (
        "RayCluster ml/loom: ready\n"
        "GROUP    DESIRED  READY  HEAD\n"
        "head           1      1  Running\n"
        "gateway        2      1\n"
        "cpu            1      1"
    )


def test_cluster_status_of_a_cluster_that_is_not_there_says_so(
    fake: FakeKubernetes, api: ApiClient
) -> None:
    with pytest.raises(DeployError, match=f"no RayCluster {NS}/loom"):
        cluster_status(api=api, namespace=NS, cluster="loom")


# --- `loom deploy` itself, with the rendered example, through a kubeconfig ------------------

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "k8s" / "loom.yaml"


def loom_deploy(fake: FakeKubernetes, tmp_path: Path, *command: str) -> int:
    from loom.cli import main

    config = kubeconfig_for(fake, tmp_path / "kubeconfig")
    return main(["deploy", *command, "--config", str(EXAMPLE), "--kubeconfig", config])


def test_loom_deploy_apply_applies_the_rendered_objects_and_waits_for_the_gateway(
    fake: FakeKubernetes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy.render import render
    from serving.config import load_config

    fake.pods = loom_pods()
    fake.cluster_ready_from_get = 2

    code = loom_deploy(fake, tmp_path, "apply", "--namespace", NS, "--timeout-s", "60")

    err = capsys.readouterr().err
    rendered = render(load_config(EXAMPLE), overlay="gpu", namespace=NS)
    patched = [seen for seen in fake.requests if seen.method == "PATCH"]
    assert code == 0, err
    assert len(patched) == len(rendered)  # every object once (14 of the example, gpu)
    assert all(seen.query["fieldManager"] == ["loom"] for seen in patched)
    sent = {(s.body["kind"], s.body["metadata"]["name"]): s.body for s in patched}
    assert sent == {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    assert err.splitlines()[-1] == "ready: the gateway Service loom-gateway has ready pods"


def test_loom_deploy_apply_without_kuberay_says_so_in_one_error_line(
    fake: FakeKubernetes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail("/apis/ray.io/", 404, "NotFound", "the server could not find the requested resource")

    code = loom_deploy(fake, tmp_path, "apply", "--namespace", NS)

    err = capsys.readouterr().err
    assert code == 2
    (error,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "KubeRay" in error
    assert "Traceback" not in err
    assert not [s for s in fake.requests if "monitoring.coreos.com" in s.path]  # stopped there


def test_loom_deploy_apply_without_permission_names_what_was_refused(
    fake: FakeKubernetes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail(
        "/roles/", 403, "Forbidden", 'roles.rbac.authorization.k8s.io "loom-leases" is forbidden'
    )

    code = loom_deploy(fake, tmp_path, "apply", "--namespace", NS)

    err = capsys.readouterr().err
    assert code == 2
    (error,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "forbidden" in error
    assert f"kubectl auth can-i patch roles.rbac.authorization.k8s.io -n {NS}" in error
    assert not [s for s in fake.requests if "/rayclusters/" in s.path]  # nothing after it


def test_loom_deploy_status_prints_the_groups_of_the_running_cluster(
    fake: FakeKubernetes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy.render import render
    from serving.config import load_config

    fake.pods = loom_pods(gateway_b_ready_from=1)
    apply(
        render(load_config(EXAMPLE), overlay="gpu", namespace=NS),
        api=ApiClient(Configuration(host=fake.url)),
        progress=lambda line: None,
    )

    code = loom_deploy(fake, tmp_path, "status", "--namespace", NS)

    out = capsys.readouterr().out
    assert code == 0
    desired = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[2:]}
    # the example's groups: the head, gateway x2, cpu x2 (min 2), gpu x1
    assert desired == {"head": 1, "gateway": 2, "cpu": 2, "gpu": 1}
