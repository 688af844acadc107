"""``deploy/kuberay.py``: the typed model of KubeRay's ``ray.io/v1`` RayCluster refuses what KubeRay
(or Loom's stricter reading of it) would, naming the field's path, and hands the pod templates
out, head first, for the Kubernetes schemas to check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest

from deploy.kuberay import HEAD_GROUP, KubeRayError, pod_templates, validate_raycluster


def pod_template(container: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "loom"}},
        "spec": {"containers": [{"name": container, "image": "registry.example.com/loom:0.1.0"}]},
    }


def worker_group(
    name: str, *, replicas: int = 1, minimum: int = 0, maximum: int = 4
) -> dict[str, Any]:
    return {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": minimum,
        "maxReplicas": maximum,
        "rayStartParams": {},
        "template": pod_template("ray-worker"),
    }


def minimal_raycluster() -> dict[str, Any]:
    """The least Loom's model accepts: a head and one worker group, no autoscaler options."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "loom"},
        "spec": {
            "rayVersion": "2.60.0",
            "enableInTreeAutoscaling": True,
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0"},
                "template": pod_template("ray-head"),
            },
            "workerGroupSpecs": [worker_group("gateway")],
        },
    }


def full_raycluster() -> dict[str, Any]:
    """Every field the model has, set."""
    cluster = minimal_raycluster()
    cluster["metadata"] |= {
        "namespace": "loom",
        "labels": {"app.kubernetes.io/part-of": "loom"},
        "annotations": {"loom.dev/config-sha256": "0" * 64},
    }
    cluster["spec"] |= {
        "autoscalerOptions": {
            "upscalingMode": "Conservative",
            "idleTimeoutSeconds": 60,
            "resources": {
                "limits": {"cpu": "500m", "memory": "512Mi"},
                "requests": {"cpu": "500m", "memory": "512Mi"},
            },
            "imagePullPolicy": "IfNotPresent",
            "version": "v2",
        },
        "gcsFaultToleranceOptions": {
            "redisAddress": "redis://redis.loom.svc:6379",
            "externalStorageNamespace": "loom",
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}}},
        },
    }
    cluster["spec"]["headGroupSpec"]["serviceType"] = "ClusterIP"
    cluster["spec"]["workerGroupSpecs"].append(worker_group("gpu", replicas=2, maximum=8))
    return cluster


def refusal(cluster: dict[str, Any]) -> str:
    with pytest.raises(KubeRayError) as refused:
        validate_raycluster(cluster)
    return str(refused.value)


def test_a_minimal_raycluster_validates() -> None:
    cluster = validate_raycluster(minimal_raycluster())

    assert cluster.metadata.name == "loom"
    assert cluster.spec.headGroupSpec.rayStartParams == {"num-cpus": "0"}
    assert [group.groupName for group in cluster.spec.workerGroupSpecs] == ["gateway"]
    assert cluster.spec.autoscalerOptions is None
    assert cluster.spec.gcsFaultToleranceOptions is None


def test_a_raycluster_with_every_modelled_field_validates_and_dumps_back_unchanged() -> None:
    rendered = full_raycluster()

    cluster = validate_raycluster(rendered)

    assert cluster.spec.autoscalerOptions is not None
    assert cluster.spec.autoscalerOptions.version == "v2"
    assert cluster.model_dump(exclude_none=True) == rendered


@pytest.mark.parametrize(
    ("where", "path"),
    [
        pytest.param(lambda c: c, "status", id="top"),
        pytest.param(lambda c: c["spec"], "spec.suspend", id="spec"),
        pytest.param(
            lambda c: c["spec"]["workerGroupSpecs"][1],
            "spec.workerGroupSpecs.1.replica",
            id="group",
        ),
        pytest.param(
            lambda c: c["spec"]["autoscalerOptions"],
            "spec.autoscalerOptions.idleTimeoutSecs",
            id="autoscalerOptions",
        ),
    ],
)
def test_an_unknown_field_is_refused_naming_its_path(
    where: Callable[[dict[str, Any]], dict[str, Any]], path: str
) -> None:
    cluster = full_raycluster()
    where(cluster)[path.rsplit(".", 1)[-1]] = 1

    assert f"{path}: unknown field" in refusal(cluster)


def test_a_non_string_ray_start_params_value_is_refused_naming_the_key() -> None:
    cluster = minimal_raycluster()
    cluster["spec"]["headGroupSpec"]["rayStartParams"] = {"num-cpus": 0, "block": "true"}

    message = refusal(cluster)

    assert message.startswith("spec.headGroupSpec.rayStartParams: rayStartParams values must be ")
    assert "'num-cpus' is int 0" in message
    assert "block" not in message


def test_min_replicas_above_max_replicas_is_refused_at_max_replicas() -> None:
    cluster = full_raycluster()
    cluster["spec"]["workerGroupSpecs"][1] |= {"minReplicas": 5, "replicas": 5, "maxReplicas": 2}

    message = refusal(cluster)

    # 0 <= 5 <= 5 holds, 5 <= 2 does not: the error sits on maxReplicas
    assert message.startswith("spec.workerGroupSpecs.1.maxReplicas: maxReplicas 2 is below ")
    assert "minReplicas 5 and replicas 5" in message


def test_replicas_below_min_replicas_is_refused_at_min_replicas() -> None:
    cluster = minimal_raycluster()
    cluster["spec"]["workerGroupSpecs"][0] |= {"minReplicas": 2, "replicas": 1, "maxReplicas": 4}

    assert refusal(cluster).startswith(
        "spec.workerGroupSpecs.0.minReplicas: minReplicas 2 is above replicas 1"
    )


def test_a_quoted_replica_count_is_refused_as_the_api_server_would() -> None:
    cluster = minimal_raycluster()
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "1"

    assert "spec.workerGroupSpecs.0.replicas: Input should be a valid integer, got '1'" in refusal(
        cluster
    )


def test_duplicate_worker_group_names_are_refused() -> None:
    cluster = full_raycluster()
    cluster["spec"]["workerGroupSpecs"].append(worker_group("gateway"))

    assert refusal(cluster) == (
        "spec.workerGroupSpecs: groupName 'gateway' is used by groups 0 and 2: worker group names "
        "must be unique"
    )


def test_a_worker_group_named_like_the_head_group_is_refused() -> None:
    cluster = minimal_raycluster()
    cluster["spec"]["workerGroupSpecs"][0]["groupName"] = HEAD_GROUP

    assert "is the head's group" in refusal(cluster)


@pytest.mark.parametrize("name", ["GPU", "gpu_workers", "-gpu", "g" * 64])
def test_a_group_name_that_is_not_a_dns_1123_label_is_refused(name: str) -> None:
    cluster = minimal_raycluster()
    cluster["spec"]["workerGroupSpecs"][0]["groupName"] = name

    assert refusal(cluster).startswith(
        f"spec.workerGroupSpecs.0.groupName: {name!r} is not a DNS-1123 label"
    )


@pytest.mark.parametrize("name", ["9loom", "Loom", "l" * 54])
def test_a_cluster_name_kuberay_would_refuse_is_refused(name: str) -> None:
    cluster = minimal_raycluster()
    cluster["metadata"]["name"] = name

    assert refusal(cluster).startswith(f"metadata.name: {name!r} is not a DNS-1035 label")


def test_a_bad_upscaling_mode_is_refused() -> None:
    cluster = full_raycluster()
    cluster["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"

    assert refusal(cluster) == (
        "spec.autoscalerOptions.upscalingMode: Input should be 'Default', 'Aggressive' or "
        "'Conservative', got 'Fast'"
    )


def test_a_plain_redis_password_is_refused() -> None:
    cluster = full_raycluster()
    cluster["spec"]["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}

    assert "spec.gcsFaultToleranceOptions.redisPassword.value: unknown field" in refusal(cluster)


def test_every_error_is_reported_each_with_its_path() -> None:
    cluster = minimal_raycluster()
    cluster["apiVersion"] = "ray.io/v1alpha1"
    del cluster["spec"]["rayVersion"]

    assert refusal(cluster).split("; ") == [
        "apiVersion: Input should be 'ray.io/v1', got 'ray.io/v1alpha1'",
        "spec.rayVersion: Field required",
    ]


def test_pod_templates_lists_the_head_first_then_each_group_in_order() -> None:
    cluster = full_raycluster()

    templates = pod_templates(cluster)

    assert templates == [
        ("headgroup", cluster["spec"]["headGroupSpec"]["template"]),
        ("gateway", cluster["spec"]["workerGroupSpecs"][0]["template"]),
        ("gpu", cluster["spec"]["workerGroupSpecs"][1]["template"]),
    ]


def test_each_pod_template_wrapped_in_a_v1_pod_template_passes_the_kubernetes_schema() -> None:
    for group, template in pod_templates(full_raycluster()):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"loom-{group}"},
            "template": template,
        }
        kubernetes_validate.validate(wrapped, kubernetes_validate.latest_version(), strict=True)


def test_a_misspelt_pod_template_field_fails_the_kubernetes_schema_not_this_model() -> None:
    cluster = minimal_raycluster()
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containerz"] = []
    (_, template), *_ = pod_templates(cluster)
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "loom-head"}}

    with pytest.raises(kubernetes_validate.ValidationError, match="'containerz' was unexpected"):
        kubernetes_validate.validate(
            wrapped | {"template": template}, kubernetes_validate.latest_version(), strict=True
        )
