"""``deploy/render.py``: what it renders passes the schemas the cluster will check it against
(Kubernetes 1.37's, strictly; KubeRay's RayCluster through ``deploy.kuberay``; the
Prometheus Operator's monitors through a short allow-list), the monitors scrape what they
should and nothing else, and what no cluster could run is refused before anything renders,
naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from rendered import (
    CONFIGS,
    NAMESPACE,
    RENDERED,
    changed_example,
    cluster_of,
    default,
    example,
    example_data,
    find,
    pod_labels,
    render_case,
    selected_groups,
)

from deploy.kuberay import HEAD_GROUP, KubeRayError, pod_templates, validate_raycluster
from deploy.render import Overlay, RenderError, render
from serving.config import ConfigError, parse_config

KUBERNETES_VERSION = "1.37"
"""The newest schemas kubernetes-validate ships (``kubernetes_validate.utils.all_versions``)."""
NOT_CORE = {"RayCluster", "PodMonitor", "ServiceMonitor"}
"""Custom resources: no Kubernetes schema; checked by ``deploy.kuberay`` and the allow-list."""
CORE_KINDS = {
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Service",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
MONITOR_FIELDS = {
    # monitoring.coreos.com/v1, the fields Loom sets (Prometheus Operator's API reference)
    "PodMonitor": {
        "spec": {"selector", "podMetricsEndpoints"},
        "spec.selector": {"matchLabels"},
        "spec.podMetricsEndpoints[]": {"port", "path", "interval"},
    },
    "ServiceMonitor": {
        "spec": {"selector", "endpoints"},
        "spec.selector": {"matchLabels"},
        "spec.endpoints[]": {"port", "path", "interval"},
    },
}
OBJECT_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
METADATA_FIELDS = {"name", "namespace", "labels"}


def validate_core(obj: dict[str, Any]) -> str:
    """The schema version ``obj`` passed, strictly (an unknown field is an error)."""
    return kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# --- Kubernetes and KubeRay schemas ----------------------------------------------------


def test_the_schemas_used_are_the_newest_kubernetes_validate_ships() -> None:
    newest = kubernetes_validate.utils.latest_version()  # "1.37.0"
    assert kubernetes_validate.utils.major_minor(newest) == KUBERNETES_VERSION


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_every_core_object_passes_the_strict_kubernetes_schema(
    config_name: str, overlay: Overlay
) -> None:
    objects = render_case(config_name, overlay)
    core = [o for o in objects if o["kind"] not in NOT_CORE]

    for obj in core:
        # validate returns the schema version it used: 1.37, not an older fallback
        assert validate_core(obj) == KUBERNETES_VERSION
    # the default elects through its job store: no Lease role to bind
    expected = CORE_KINDS if config_name == "example" else CORE_KINDS - {"Role", "RoleBinding"}
    assert {o["kind"] for o in core} == expected


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_every_pod_template_of_the_raycluster_passes_as_a_v1_pod_template(
    config_name: str, overlay: Overlay
) -> None:
    raycluster = find(render_case(config_name, overlay), "RayCluster")

    templates = pod_templates(raycluster)

    for group, template in templates:
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"loom-{group}"},
            "template": template,
        }
        assert validate_core(wrapped) == KUBERNETES_VERSION
    groups = ["headgroup", "gateway", "cpu", *(["gpu"] if overlay == "gpu" else [])]
    assert [group for group, _ in templates] == groups


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_raycluster_passes_the_kuberay_model(config_name: str, overlay: Overlay) -> None:
    raycluster = find(render_case(config_name, overlay), "RayCluster")

    model = validate_raycluster(raycluster)

    assert model.metadata.namespace == NAMESPACE


def test_an_unknown_field_in_the_rendered_raycluster_is_refused_naming_its_path() -> None:
    raycluster = copy.deepcopy(find(render_case("example", "gpu"), "RayCluster"))
    raycluster["spec"]["workerGroupSpecs"][0]["replica"] = 1  # for "replicas"

    with pytest.raises(KubeRayError, match=r"spec\.workerGroupSpecs\.0\.replica: unknown field"):
        validate_raycluster(raycluster)


def test_an_unknown_field_in_a_rendered_core_object_is_refused_by_the_strict_schema() -> None:
    service = copy.deepcopy(find(render_case("example", "gpu"), "Service"))
    service["spec"]["portz"] = service["spec"]["ports"]

    with pytest.raises(kubernetes_validate.ValidationError, match="'portz' was unexpected"):
        validate_core(service)


def test_an_unknown_field_in_a_pod_template_is_refused_by_the_strict_schema() -> None:
    raycluster = copy.deepcopy(find(render_case("example", "gpu"), "RayCluster"))
    gpu_pod = raycluster["spec"]["workerGroupSpecs"][2]["template"]["spec"]
    gpu_pod["initContainers"][0]["restartPolicyy"] = "Always"
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "loom-gpu"}}

    with pytest.raises(kubernetes_validate.ValidationError, match="'restartPolicyy' was"):
        validate_core(wrapped | {"template": raycluster["spec"]["workerGroupSpecs"][2]["template"]})


# --- Prometheus Operator monitors -------------------------------------------------------


def unknown_monitor_fields(monitor: dict[str, Any]) -> list[str]:
    """The paths of fields outside ``MONITOR_FIELDS`` (empty: every field is one Loom sets)."""
    allowed = MONITOR_FIELDS[monitor["kind"]]
    unknown = [f"{key}" for key in monitor.keys() - OBJECT_FIELDS]
    unknown += [f"metadata.{key}" for key in monitor["metadata"].keys() - METADATA_FIELDS]
    spec = monitor["spec"]
    unknown += [f"spec.{key}" for key in spec.keys() - allowed["spec"]]
    unknown += [
        f"spec.selector.{key}" for key in spec["selector"].keys() - allowed["spec.selector"]
    ]
    endpoints = "podMetricsEndpoints" if monitor["kind"] == "PodMonitor" else "endpoints"
    for i, endpoint in enumerate(spec[endpoints]):
        extra = endpoint.keys() - allowed[f"spec.{endpoints}[]"]
        unknown += [f"spec.{endpoints}[{i}].{key}" for key in extra]
    return sorted(unknown)


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_monitors_set_only_fields_of_the_prometheus_operator_api(
    config_name: str, overlay: Overlay
) -> None:
    objects = render_case(config_name, overlay)

    for kind in ("PodMonitor", "ServiceMonitor"):
        monitor = find(objects, kind)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert unknown_monitor_fields(monitor) == [], kind


def test_a_field_outside_the_allow_list_is_named_by_the_monitor_check() -> None:
    monitor = copy.deepcopy(find(render_case("example", "gpu"), "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["scrapeTimeout"] = "3s"
    monitor["spec"]["selector"]["matchExpressions"] = []

    assert unknown_monitor_fields(monitor) == [
        "spec.podMetricsEndpoints[0].scrapeTimeout",
        "spec.selector.matchExpressions",
    ]


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_pod_monitor_selects_the_worker_pods_and_not_the_head_or_gateway(
    config_name: str, overlay: Overlay
) -> None:
    objects = render_case(config_name, overlay)
    raycluster = find(objects, "RayCluster")
    spec = find(objects, "PodMonitor")["spec"]

    picked = selected_groups(raycluster, spec["selector"]["matchLabels"])

    assert picked == (["cpu", "gpu"] if overlay == "gpu" else ["cpu"])
    assert HEAD_GROUP not in picked
    assert "gateway" not in picked
    # what it scrapes is the sidecar's named port, on every pod it picks
    (endpoint,) = spec["podMetricsEndpoints"]
    for group in picked:
        (worker,) = [g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == group]
        (sidecar,) = worker["template"]["spec"]["initContainers"]
        assert endpoint["port"] in [p["name"] for p in sidecar["ports"]]


def test_a_pod_monitor_selecting_by_the_cluster_alone_would_pick_the_head_too() -> None:
    # the check above can fail: drop the component label and every group matches
    raycluster = find(render_case("example", "gpu"), "RayCluster")
    by_cluster = {"ray.io/cluster": raycluster["metadata"]["name"]}

    assert selected_groups(raycluster, by_cluster) == [HEAD_GROUP, "gateway", "cpu", "gpu"]
    assert pod_labels(raycluster, HEAD_GROUP)["ray.io/node-type"] == "head"


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_service_monitor_selects_the_gateway_service_by_its_labels_and_port(
    config_name: str, overlay: Overlay
) -> None:
    objects = render_case(config_name, overlay)
    service = find(objects, "Service", f"{cluster_of(CONFIGS[config_name]()).name}-gateway")
    spec = find(objects, "ServiceMonitor")["spec"]

    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    # only the gateway Service carries its labels
    services = [o for o in objects if o["kind"] == "Service"]
    assert services == [service]


# --- refusals: deploy/render.py ---------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "field"),
    [
        pytest.param({"api_keys": ["k" * 20]}, "server.api_keys", id="api_keys"),
        pytest.param({"admin_api_keys": ["k" * 20]}, "server.admin_api_keys", id="admin_api_keys"),
        pytest.param(
            {"keys": [{"name": "ci", "key": "k" * 20, "scopes": ["infer"]}]},
            "server.keys.0.key",
            id="keys",
        ),
    ],
)
def test_a_key_in_clear_is_refused_since_it_would_land_in_a_config_map(
    server: dict[str, Any], field: str
) -> None:
    config = changed_example(lambda data: data.update(server=server))

    for overlay in ("cpu", "gpu"):
        with pytest.raises(RenderError, match=rf"{field}: keys in clear .* key_sha256"):
            render(config, overlay=overlay)


def test_a_key_given_as_its_digest_renders() -> None:
    entry = {"name": "ci", "key_sha256": "ab" * 32, "scopes": ["infer"]}  # 64 hex digits
    config = changed_example(lambda data: data.update(server={"keys": [entry]}))

    text = find(render(config, overlay="gpu"), "ConfigMap")["data"]["loom.yaml"]

    assert parse_config(yaml.safe_load(text)).server.keys[0].key_sha256 == "ab" * 32


def test_server_tls_is_refused_naming_the_field(tmp_path: Path) -> None:
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_text("not read: the validator checks readability only\n")
    keyfile.write_text("not read either\n")
    tls = {"certfile": str(certfile), "keyfile": str(keyfile)}
    config = changed_example(lambda data: data.update(server={"tls": tls}))

    with pytest.raises(RenderError, match=r"server\.tls: .*Ingress"):
        render(config, overlay="gpu")


def test_the_gpu_overlay_of_a_config_that_asks_for_no_gpu_is_refused() -> None:
    with pytest.raises(RenderError, match=r"no model sets num_gpus and training\.gpus is unset"):
        render(default(), overlay="gpu")


def test_the_gpu_overlay_renders_for_training_gpus_alone() -> None:
    # the refusal above is for "neither": training.gpus alone is enough to want GPU pods
    config = parse_config(
        {"models": [{"name": "minilm", "source": "minilm"}], "training": {"gpus": 1}}
    )

    assert "gpu" in [g for g, _ in pod_templates(find(render(config, overlay="gpu"), "RayCluster"))]


def test_a_model_needing_more_cpus_than_a_cpu_worker_pod_has_is_refused() -> None:
    # minilm asks 5 CPUs a replica; a cpu_workers pod of the example has 4
    config = changed_example(lambda data: data["models"][0].update(num_cpus=5))

    for overlay in ("cpu", "gpu"):
        with pytest.raises(RenderError, match=r"minilm: a replica needs 5\.0 CPUs; a pod of "
                           r"cluster\.cpu_workers has 4"):  # fmt: skip
            render(config, overlay=overlay)


def test_a_gpu_model_on_the_cpu_overlay_is_checked_against_the_cpu_worker_pod() -> None:
    # chat asks 6 CPUs: it fits a gpu_workers pod (8) but, moved to CPUs, not a cpu one (4)
    config = changed_example(lambda data: data["models"][1].update(num_cpus=6))

    assert render(config, overlay="gpu")
    with pytest.raises(RenderError, match=r"chat: .* 6\.0 CPUs; a pod of cluster\.cpu_workers"):
        render(config, overlay="cpu")


def test_a_model_needing_more_gpus_than_a_gpu_worker_pod_has_is_refused() -> None:
    # chat asks 2 GPUs a replica; a gpu_workers pod of the example holds 1
    config = changed_example(lambda data: data["models"][1].update(num_gpus=2))

    with pytest.raises(RenderError, match=r"chat: a replica needs 2\.0 GPUs; a pod of "
                       r"cluster\.gpu_workers has 1"):  # fmt: skip
        render(config, overlay="gpu")


def test_every_problem_is_named_in_one_refusal() -> None:
    def two_problems(data: dict[str, Any]) -> None:
        data["server"] = {"api_keys": ["k" * 20]}
        data["models"][1]["num_gpus"] = 2

    with pytest.raises(RenderError) as refused:
        render(changed_example(two_problems), overlay="gpu")

    assert str(refused.value).count("; ") >= 1
    assert "server.api_keys: keys in clear" in str(refused.value)
    assert "chat: a replica needs 2.0 GPUs" in str(refused.value)


# --- refusals: serving/config/cluster.py (and the server section it relies on) -----------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda data: data["cluster"].update(stats_dir="/var/lib/loom/stats"),
            r"cluster: .*stats_dir must be node-local, not under home",
            id="stats_dir-under-home",
        ),
        pytest.param(
            lambda data: data["cluster"]["cpu_workers"].update(min_replicas=3),
            r"cluster\.cpu_workers: .*need min_replicas <= replicas <= max_replicas, "
            r"got 3 <= 2 <= 8",
            id="min_replicas-above-replicas",
        ),
        pytest.param(
            lambda data: data["cluster"]["gpu_workers"].update(memory="32 GB"),
            r"cluster\.gpu_workers\.memory: .*'32 GB' is not a Kubernetes quantity",
            id="bad-quantity",
        ),
        pytest.param(
            lambda data: data["cluster"]["storage"].update(size="200 gigs"),
            r"cluster\.storage\.size: .*not a Kubernetes quantity",
            id="bad-storage-size",
        ),
        pytest.param(
            lambda data: data["cluster"].update(home="var/lib/loom"),
            r"cluster\.home: .*must be an absolute path",
            id="relative-home",
        ),
        pytest.param(
            lambda data: data.update(server={"gateway_replicas": 2}),
            r"server: .*gateway_replicas > 1 needs gateway_node_resource",
            id="gateways-without-node-resource",
        ),
    ],
)
def test_a_cluster_config_no_cluster_could_run_is_refused_naming_the_field(
    change: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        changed_example(change)


def test_the_unchanged_example_parses_so_each_refusal_is_its_one_change() -> None:
    assert parse_config(example_data()) == example()
