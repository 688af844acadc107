"""The rendered objects as a kustomize tree: a base (the cpu overlay's objects, one file
each) and the ``cpu`` and ``gpu`` overlays (the namespace; the gpu overlay's patch adds the
GPU worker group). ``deploy/k8s/`` is this tree for ``deploy/k8s/loom.yaml``, written by
``loom deploy render --config deploy/k8s/loom.yaml --out deploy/k8s`` (a test checks it is
current).

    write_tree(load_config(Path("loom.yaml")), Path("deploy/k8s"), namespace="loom")
    # kubectl apply -k deploy/k8s/overlays/gpu   ==   loom deploy render --overlay gpu
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from deploy.render import (
    OVERLAYS,
    Overlay,
    Patch,
    apply_patch,
    base,
    dump,
    patches,
    set_namespace,
)
from serving.config import LoomConfig

CONFIG_FILE = "loom.yaml"
"""The source config's name in the tree (beside base/ and overlays/)."""

PRODUCTION = {
    "ServiceAccount": "The pods' identity. Production: nothing to change; its token is mounted "
    "in the head pod only, and only with control_plane.lease_backend: kubernetes.",
    "Role": "Exactly the Lease verbs the control-plane election calls (training/k8s_leases.py) "
    "in this namespace. Production: nothing to widen.",
    "RoleBinding": "Binds the Lease role to the pods' service account.",
    "ConfigMap": "Loom's config, whole: the head pod's `loom serve --in-cluster` reads it. "
    "Production: edit the source config and render again, never this file.",
    "PersistentVolumeClaim": "$LOOM_HOME on every pod: the model store and job workspaces. "
    "Production: a ReadWriteMany storage class (NFS, CephFS, EFS, Filestore) and its size "
    "(cluster.storage).",
    "Service": "The gateway: the only thing clients reach. Production: keep ClusterIP and put "
    "an Ingress (TLS) in front, as below, or make it a LoadBalancer.",
    "RayCluster": "The Ray cluster (KubeRay): the head runs Ray's GCS and Loom's control plane, "
    "the gateway pods serve HTTP, the worker groups run model replicas and training. "
    "Production: the image (a digest), pod sizes and group bounds: cluster: in the config.",
    "PodDisruptionBudget": "At most one pod of the group drained at a time. Production: raise "
    "maxUnavailable for faster node upgrades when the groups are large.",
    "NetworkPolicy": "Ingress rules (they add up): Ray's ports inside the cluster only, the "
    "gateway port from anywhere, the sidecars from Prometheus's namespace. Production: narrow "
    "the gateway rule to your ingress controller's namespace; name Prometheus's namespace.",
    "PodMonitor": "Prometheus Operator: scrape every worker pod's monitoring sidecar. "
    "Production: match your Prometheus's podMonitorSelector (a release label, say).",
    "ServiceMonitor": "Prometheus Operator: scrape each gateway pod's /metrics. Production: "
    "match your Prometheus's serviceMonitorSelector.",
}
PATCHES = {
    "RayCluster": "Adds the GPU worker group: the only pods that ask for GPUs.",
    "ConfigMap": "The config with every model on CPUs (num_gpus 0, device cpu): the same models "
    "on a cluster without GPUs.",
}
INGRESS_EXAMPLE = """\
# An Ingress in front of the gateway (TLS at the ingress controller). Uncomment and edit:
# ---
# apiVersion: networking.k8s.io/v1
# kind: Ingress
# metadata:
#   name: {name}-gateway
#   annotations:
#     nginx.ingress.kubernetes.io/proxy-read-timeout: "600"   # streamed generation
#     nginx.ingress.kubernetes.io/proxy-body-size: "1m"       # server.max_body_bytes
# spec:
#   ingressClassName: nginx
#   tls:
#     - hosts: [loom.example.com]
#       secretName: loom-tls
#   rules:
#     - host: loom.example.com
#       http:
#         paths:
#           - path: /
#             pathType: Prefix
#             backend:
#               service:
#                 name: {name}-gateway
#                 port:
#                   name: http
"""


def _comment(text: str) -> str:
    words, lines, line = text.split(), [], "#"
    for word in words:
        if len(line) + 1 + len(word) > 92:
            lines.append(line)
            line = "#"
        line += " " + word
    return "\n".join([*lines, line]) + "\n"


def file_name(index: int, obj: dict[str, Any]) -> str:
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def tree(
    config: LoomConfig, *, namespace: str, overlays: Sequence[Overlay] = OVERLAYS
) -> dict[str, str]:
    """Path (relative to the tree's root) -> text, for every file of the tree (the base,
    and each of ``overlays``)."""
    objects = base(config)
    files: dict[str, str] = {}
    for index, obj in enumerate(objects, 1):
        text = _comment(PRODUCTION[obj["kind"]]) + dump(obj)
        if obj["kind"] == "Service":
            text += INGRESS_EXAMPLE.format(name=obj["metadata"]["name"].removesuffix("-gateway"))
        files[f"base/{file_name(index, obj)}"] = text
    resources = [name.removeprefix("base/") for name in files]
    files["base/kustomization.yaml"] = _comment(
        "Loom's objects, rendered from ../loom.yaml; apply an overlay, not this base."
    ) + dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
              "resources": resources})  # fmt: skip
    for overlay in overlays:
        kustomization: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "resources": ["../../base"],
        }
        for n, patch in enumerate(patches(config, overlay), 1):
            path = f"{patch.kind.lower()}-patch-{n}.yaml"
            files[f"overlays/{overlay}/{path}"] = _comment(PATCHES[patch.kind]) + dump(
                list(patch.ops)
            )
            target = {"version": "v1", "kind": patch.kind, "name": patch.name}
            if patch.kind == "RayCluster":
                target = {"group": "ray.io", **target}
            kustomization.setdefault("patches", []).append({"path": path, "target": target})
        note = f"The {overlay} overlay: `kubectl apply -k` here (or `loom deploy apply "
        note += f"--overlay {overlay}`). Production: the namespace."
        files[f"overlays/{overlay}/kustomization.yaml"] = _comment(note) + dump(kustomization)
    return files


def write_tree(
    config: LoomConfig,
    root: Path,
    *,
    namespace: str,
    source: str,
    overlays: Sequence[Overlay] = OVERLAYS,
) -> list[Path]:
    """Write the tree under ``root`` (its base/ and overlays/ replaced) with the source
    config's text beside them; the paths written."""
    for folder in ("base", "overlays"):
        shutil.rmtree(root / folder, ignore_errors=True)
    written = []
    for relative, text in tree(config, namespace=namespace, overlays=overlays).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    config_path = root / CONFIG_FILE
    if not config_path.exists() or config_path.read_text(encoding="utf-8") != source:
        config_path.write_text(source, encoding="utf-8")
        written.append(config_path)
    return written


def build(root: Path, overlay: str) -> list[dict[str, Any]]:
    """What ``kustomize build root/overlays/<overlay>`` gives for a tree this module wrote:
    the base's objects in order, the overlay's namespace and its add patches applied."""
    overlay_dir = root / "overlays" / overlay
    kustomization = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    base_dir = (overlay_dir / kustomization["resources"][0]).resolve()
    listed = yaml.safe_load((base_dir / "kustomization.yaml").read_text())["resources"]
    objects = [yaml.safe_load((base_dir / name).read_text()) for name in listed]
    for entry in kustomization.get("patches", []):
        ops = yaml.safe_load((overlay_dir / entry["path"]).read_text())
        target = entry["target"]
        apply_patch(objects, Patch(target["kind"], target["name"], tuple(ops)))
    set_namespace(objects, kustomization["namespace"])
    return objects
