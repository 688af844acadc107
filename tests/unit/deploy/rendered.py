"""What the render tests share: the two configs they render (the example ``deploy/k8s/loom.yaml``
and the bundled default), the overlays each renders in, and how to read the rendered objects
the way KubeRay and Kubernetes read them (the labels KubeRay puts on a group's pods, which pods
a selector picks)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.kuberay import HEAD_GROUP
from deploy.render import CPU_GROUP, GPU_GROUP, Overlay, render, with_cluster
from serving.config import LoomConfig, default_config, load_config, parse_config
from serving.config.cluster import ClusterConfig

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "deploy" / "k8s"
EXAMPLE = K8S / "loom.yaml"
NAMESPACE = "prod-ml"
"""Not the example's "loom": a namespace left out somewhere would show."""


def example() -> LoomConfig:
    return load_config(EXAMPLE)


def example_data() -> dict[str, Any]:
    """The example as parsed YAML, for a test to change one field of."""
    return yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))


def changed_example(change: Callable[[dict[str, Any]], object]) -> LoomConfig:
    """The example with ``change`` applied to its parsed YAML."""
    data = copy.deepcopy(example_data())
    change(data)
    return parse_config(data)


def default() -> LoomConfig:
    """The bundled default, as on a 2-core machine (2 replicas of MiniLM, no GPU)."""
    return default_config(2)


CONFIGS: dict[str, Callable[[], LoomConfig]] = {"example": example, "default": default}
RENDERED = [
    pytest.param("example", "cpu", id="example-cpu"),
    pytest.param("example", "gpu", id="example-gpu"),
    # the default asks for no GPU: its gpu overlay is refused (test_render_validation)
    pytest.param("default", "cpu", id="default-cpu"),
]
"""Every (config, overlay) that renders."""


def render_case(config_name: str, overlay: Overlay) -> list[dict[str, Any]]:
    """The objects of one of ``RENDERED``, in ``NAMESPACE``."""
    return render(CONFIGS[config_name](), overlay=overlay, namespace=NAMESPACE)


def cluster_of(config: LoomConfig) -> ClusterConfig:
    cluster = with_cluster(config).cluster
    assert cluster is not None
    return cluster


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (named ``name``, when given)."""
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}"
    return found[0]


def group_spec(raycluster: dict[str, Any], group: str) -> dict[str, Any]:
    """The head group's spec (``HEAD_GROUP``) or the worker group named ``group``."""
    spec = raycluster["spec"]
    if group == HEAD_GROUP:
        return spec["headGroupSpec"]
    (found,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == group]
    return found


def group_names(raycluster: dict[str, Any]) -> list[str]:
    return [g["groupName"] for g in raycluster["spec"]["workerGroupSpecs"]]


def pod_labels(raycluster: dict[str, Any], group: str) -> dict[str, str]:
    """The labels a pod of ``group`` carries: its template's and the three KubeRay adds."""
    template = group_spec(raycluster, group)["template"]
    return {
        **template.get("metadata", {}).get("labels", {}),
        "ray.io/cluster": raycluster["metadata"]["name"],
        "ray.io/group": group,
        "ray.io/node-type": "head" if group == HEAD_GROUP else "worker",
    }


def all_groups(raycluster: dict[str, Any]) -> list[str]:
    return [HEAD_GROUP, *group_names(raycluster)]


def selected_groups(raycluster: dict[str, Any], match_labels: dict[str, str]) -> list[str]:
    """The groups whose pods a ``matchLabels`` selector picks (every label present, equal)."""
    return [
        group
        for group in all_groups(raycluster)
        if match_labels.items() <= pod_labels(raycluster, group).items()
    ]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a pod template, init containers (the sidecar) first."""
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def gpu_requests(objects: list[dict[str, Any]]) -> dict[str, int]:
    """Where GPUs are asked for: ``{group or container path: GPUs}`` over every container of
    every pod template (init containers too)."""
    asked: dict[str, int] = {}
    for obj in objects:
        if obj["kind"] != "RayCluster":
            continue
        spec = obj["spec"]
        groups = [("headgroup", spec["headGroupSpec"])]
        groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for group, entry in groups:
            pod = entry["template"]["spec"]
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                for kind in ("requests", "limits"):
                    for key, amount in c.get("resources", {}).get(kind, {}).items():
                        if key.endswith("/gpu"):
                            where = f"{group}/{c['name']}"
                            asked[where] = max(asked.get(where, 0), math.ceil(float(amount)))
    return asked


def model_groups(config: LoomConfig) -> dict[str, str]:
    """Which worker group each deployed model's replicas run in."""
    return {m.name: GPU_GROUP if m.num_gpus > 0 else CPU_GROUP for m in config.deployed()}
