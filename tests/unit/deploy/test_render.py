"""``deploy/render.py``: the objects say what the config says. The ConfigMap carries the config
back unchanged (on CPUs for the cpu overlay), GPUs are asked exactly where GPU replicas run,
the Role grants exactly the Lease calls the election makes, every pod runs unprivileged, only
the gateway port is open to the world; the committed kustomize tree is what renders now, and
``loom deploy render`` prints the same objects."""

from __future__ import annotations

import ast
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from rendered import (
    CONFIGS,
    EXAMPLE,
    K8S,
    NAMESPACE,
    RENDERED,
    REPO,
    all_groups,
    changed_example,
    cluster_of,
    containers,
    default,
    example,
    find,
    gpu_requests,
    group_names,
    group_spec,
    model_groups,
    render_case,
    selected_groups,
)

from deploy.kuberay import HEAD_GROUP
from deploy.kustomize import build, tree, write_tree
from deploy.render import (
    LEASE_VERBS,
    OVERLAYS,
    Overlay,
    RenderError,
    on_cpu,
    render,
    with_cluster,
)
from loom.cli import main
from serving.config import LoomConfig, default_config, load_config, parse_config

LEASE_CLIENT = REPO / "training" / "k8s_leases.py"
RENDER_AGAIN = "run `loom deploy render --config deploy/k8s/loom.yaml --out deploy/k8s`"


def configmap_config(objects: list[dict[str, Any]]) -> LoomConfig:
    """The config the head pod reads: the ConfigMap's ``loom.yaml``, parsed."""
    return parse_config(yaml.safe_load(find(objects, "ConfigMap")["data"]["loom.yaml"]))


# --- the ConfigMap carries the config -----------------------------------------------------


def test_the_gpu_overlay_configmap_holds_the_example_as_written() -> None:
    source = example()

    assert configmap_config(render(source, overlay="gpu")) == source


def test_the_cpu_overlay_configmap_holds_the_example_moved_to_cpus() -> None:
    source = example()

    held = configmap_config(render(source, overlay="cpu"))

    assert held == on_cpu(source)
    assert held != source  # chat had num_gpus 1 and training.gpus 1: both gone
    assert [m.num_gpus for m in held.deployed()] == [0.0, 0.0]
    assert held.training.gpus is None


def test_the_default_configmap_holds_the_default_with_the_default_cluster_section() -> None:
    source = default()  # no cluster: section; the ConfigMap writes the defaults' out

    held = configmap_config(render(source, overlay="cpu"))

    assert held == with_cluster(source)
    assert held == on_cpu(with_cluster(source))  # no GPU to move: on_cpu changes nothing


# --- GPUs exactly where GPU replicas run -----------------------------------------------------


def test_only_the_gpu_groups_ray_container_asks_for_gpus() -> None:
    config = example()
    objects = render(config, overlay="gpu")

    # no head, gateway, cpu-group or sidecar (init) container appears
    assert gpu_requests(objects) == {"gpu/ray-worker": cluster_of(config).gpu_workers.gpus}


def test_a_sidecar_asking_for_a_gpu_would_be_reported() -> None:
    # the check above can fail: a GPU on the gpu group's sidecar shows under its name
    objects = copy.deepcopy(render(example(), overlay="gpu"))
    gpu_pod = group_spec(find(objects, "RayCluster"), "gpu")["template"]["spec"]
    gpu_pod["initContainers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"

    assert gpu_requests(objects) == {"gpu/ray-worker": 1, "gpu/loom-sidecar": 1}


def test_every_gpu_model_runs_in_the_gpu_group_and_fits_one_of_its_pods() -> None:
    config = example()
    gpus_per_pod = cluster_of(config).gpu_workers.gpus

    groups = model_groups(config)

    assert groups == {"minilm": "cpu", "chat": "gpu"}
    for model in config.deployed():
        if model.num_gpus > 0:
            assert groups[model.name] == "gpu"
            assert model.num_gpus <= gpus_per_pod  # chat: 1 <= 1
    assert "gpu" in group_names(find(render(config, overlay="gpu"), "RayCluster"))


def test_the_gpu_pods_carry_the_node_selector_and_tolerations_of_the_config() -> None:
    toleration = {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}

    def on_h100_nodes(data: dict[str, Any]) -> None:
        data["cluster"]["gpu_workers"]["node_selector"] = {"example.com/accelerator": "h100"}
        data["cluster"]["gpu_workers"]["tolerations"] = [toleration]

    raycluster = find(render(changed_example(on_h100_nodes), overlay="gpu"), "RayCluster")

    gpu_pod = group_spec(raycluster, "gpu")["template"]["spec"]
    assert gpu_pod["nodeSelector"] == {"example.com/accelerator": "h100"}
    assert gpu_pod["tolerations"] == [toleration]
    for group in (HEAD_GROUP, "gateway", "cpu"):
        assert "nodeSelector" not in group_spec(raycluster, group)["template"]["spec"]


def test_the_example_gpu_pods_default_to_nvidias_label_and_taint() -> None:
    raycluster = find(render(example(), overlay="gpu"), "RayCluster")

    gpu_pod = group_spec(raycluster, "gpu")["template"]["spec"]

    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu_pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


@pytest.mark.parametrize("config_name", ["example", "default"])
def test_the_cpu_overlay_asks_for_no_gpu_and_has_no_gpu_group(config_name: str) -> None:
    objects = render_case(config_name, "cpu")

    assert gpu_requests(objects) == {}
    assert group_names(find(objects, "RayCluster")) == ["gateway", "cpu"]


# --- RBAC: exactly the Lease calls -----------------------------------------------------------


def lease_client_verbs() -> dict[str, str]:
    """``{method: verb}`` for every ``self.api.<method>(...)`` call in training/k8s_leases.py."""
    prefixes = {
        "read_": "get",
        "create_": "create",
        "replace_": "update",
        "patch_": "patch",
        "delete_": "delete",
        "list_": "list",
    }
    calls = {}
    for node in ast.walk(ast.parse(LEASE_CLIENT.read_text(encoding="utf-8"))):
        match node:
            case ast.Call(
                func=ast.Attribute(
                    value=ast.Attribute(value=ast.Name(id="self"), attr="api"), attr=method
                )
            ):
                verbs = [verb for prefix, verb in prefixes.items() if method.startswith(prefix)]
                assert len(verbs) == 1, f"self.api.{method}: which RBAC verb does it need?"
                calls[method] = verbs[0]
    return calls


def test_the_lease_client_makes_the_three_calls_the_role_is_written_for() -> None:
    # the parse finds the calls, so the test below compares against something real
    assert lease_client_verbs() == {
        "read_namespaced_lease": "get",
        "create_namespaced_lease": "create",
        "replace_namespaced_lease": "update",
    }


def test_the_role_grants_exactly_the_verbs_the_lease_client_calls_on_leases_only() -> None:
    objects = render(example(), overlay="gpu", namespace=NAMESPACE)

    role = find(objects, "Role")

    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": list(LEASE_VERBS)}
    ]
    assert set(role["rules"][0]["verbs"]) == set(lease_client_verbs().values())


def test_the_role_is_bound_to_the_pods_service_account_in_the_namespace() -> None:
    objects = render(example(), overlay="gpu", namespace=NAMESPACE)
    account = find(objects, "ServiceAccount")["metadata"]["name"]

    binding = find(objects, "RoleBinding")

    assert binding["roleRef"]["name"] == find(objects, "Role")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    head = group_spec(find(objects, "RayCluster"), HEAD_GROUP)["template"]["spec"]
    assert head["serviceAccountName"] == account
    assert head["automountServiceAccountToken"] is True  # the election needs its token


def test_with_leases_in_the_job_store_no_role_is_rendered_and_no_token_mounted() -> None:
    def store_no_autoscaler(data: dict) -> None:
        data["control_plane"].update(lease_backend="store")
        data["cluster"]["autoscaler"] = {"enabled": False}

    objects = render(changed_example(store_no_autoscaler), overlay="gpu")

    assert {"Role", "RoleBinding"}.isdisjoint(o["kind"] for o in objects)
    raycluster = find(objects, "RayCluster")
    for group in all_groups(raycluster):
        pod = group_spec(raycluster, group)["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, group
    assert find(objects, "ServiceAccount")["automountServiceAccountToken"] is False


def test_ray_s_autoscaler_in_the_head_gets_the_token_even_without_leases() -> None:
    """KubeRay runs Ray's autoscaler as a container of the head pod; it calls the API server
    with the pod's service account token (RBAC: KubeRay's own Role for it)."""
    config = changed_example(lambda data: data["control_plane"].update(lease_backend="store"))

    raycluster = find(render(config, overlay="gpu"), "RayCluster")

    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is True
    for group in all_groups(raycluster)[1:]:  # the head first, then the worker groups
        pod = group_spec(raycluster, group)["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, group


# --- security and shape ----------------------------------------------------------------------


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_every_container_runs_as_non_root_without_privilege_escalation(
    config_name: str, overlay: Overlay
) -> None:
    raycluster = find(render_case(config_name, overlay), "RayCluster")

    checked = []
    for group in all_groups(raycluster):
        template = group_spec(raycluster, group)["template"]
        pod_security = template["spec"]["securityContext"]
        for container in containers(template):
            security = {**pod_security, **container["securityContext"]}
            assert security["runAsNonRoot"] is True, (group, container["name"])
            assert security["runAsUser"] != 0, (group, container["name"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            checked.append(f"{group}/{container['name']}")
    # head 1 + gateway 1 + 2 (ray-worker, sidecar) per model group: 4 on cpu, 6 on gpu
    assert len(checked) == 1 + 1 + 2 * (2 if overlay == "gpu" else 1)


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_head_runs_no_replica_and_its_command_is_loom_serve_in_cluster(
    config_name: str, overlay: Overlay
) -> None:
    head = group_spec(find(render_case(config_name, overlay), "RayCluster"), HEAD_GROUP)

    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert "loom serve --in-cluster" in " ".join(container["command"] + container["args"])


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_every_worker_pod_has_the_sidecar_as_a_native_sidecar_sharing_its_pids(
    config_name: str, overlay: Overlay
) -> None:
    raycluster = find(render_case(config_name, overlay), "RayCluster")

    workers = group_names(raycluster)[1:]  # the model groups, not the gateway

    assert workers == (["cpu", "gpu"] if overlay == "gpu" else ["cpu"])
    for group in workers:
        pod = group_spec(raycluster, group)["template"]["spec"]
        (sidecar,) = pod["initContainers"]
        assert sidecar["name"] == "loom-sidecar"
        assert sidecar["restartPolicy"] == "Always"
        assert pod["shareProcessNamespace"] is True


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_gateway_service_is_cluster_ip_on_server_port_to_the_gateway_pods(
    config_name: str, overlay: Overlay
) -> None:
    config = CONFIGS[config_name]()
    objects = render_case(config_name, overlay)
    raycluster = find(objects, "RayCluster")

    spec = find(objects, "Service")["spec"]

    assert spec["type"] == "ClusterIP"
    assert selected_groups(raycluster, spec["selector"]) == ["gateway"]
    (port,) = spec["ports"]
    assert port["port"] == config.server.port
    (gateway,) = group_spec(raycluster, "gateway")["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert named[port["targetPort"]] == config.server.port


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_only_policy_open_to_the_world_admits_the_gateway_port_on_gateway_pods(
    config_name: str, overlay: Overlay
) -> None:
    config = CONFIGS[config_name]()
    objects = render_case(config_name, overlay)
    raycluster = find(objects, "RayCluster")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]

    # a rule without "from" admits every source
    open_rules = [
        (policy, rule)
        for policy in policies
        for rule in policy["spec"]["ingress"]
        if "from" not in rule
    ]

    ((policy, rule),) = open_rules
    assert selected_groups(raycluster, policy["spec"]["podSelector"]["matchLabels"]) == ["gateway"]
    assert rule["ports"] == [{"protocol": "TCP", "port": config.server.port}]


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_the_gateway_is_ready_on_health_ready_and_live_on_health_live(
    config_name: str, overlay: Overlay
) -> None:
    raycluster = find(render_case(config_name, overlay), "RayCluster")

    (gateway,) = group_spec(raycluster, "gateway")["template"]["spec"]["containers"]

    ready, live = gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/v2/health/ready", "http")
    assert (live["path"], live["port"]) == ("/v2/health/live", "http")
    assert "http" in [p["name"] for p in gateway["ports"]]


@pytest.mark.parametrize(("config_name", "overlay"), RENDERED)
def test_every_object_is_in_the_namespace_asked_for(config_name: str, overlay: Overlay) -> None:
    objects = render_case(config_name, overlay)

    assert {o["metadata"]["namespace"] for o in objects} == {NAMESPACE}
    subjects = [s for o in objects for s in o.get("subjects", [])]
    assert all(s["namespace"] == NAMESPACE for s in subjects)
    assert len(subjects) == (1 if config_name == "example" else 0)  # the Lease RoleBinding's


# --- the committed kustomize tree -------------------------------------------------------------


def committed_tree() -> dict[str, str]:
    return {
        path.relative_to(K8S).as_posix(): path.read_text(encoding="utf-8")
        for folder in ("base", "overlays")
        for path in sorted((K8S / folder).rglob("*"))
        if path.is_file()
    }


def test_the_committed_tree_is_what_the_example_renders_now() -> None:
    rendered_now = tree(load_config(EXAMPLE), namespace="loom")
    committed = committed_tree()

    stale = sorted(
        path
        for path in rendered_now.keys() | committed.keys()
        if rendered_now.get(path) != committed.get(path)
    )

    assert stale == [], f"deploy/k8s differs from its render in {stale}: {RENDER_AGAIN}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_building_a_committed_overlay_gives_what_render_gives(overlay: Overlay) -> None:
    built = build(K8S, overlay)

    assert built == render(load_config(EXAMPLE), overlay=overlay, namespace="loom"), RENDER_AGAIN


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_builds_the_objects_render_gives_in_its_own_order(
    overlay: Overlay,
) -> None:
    # the real kustomize, not deploy.kustomize.build's imitation of it: the same objects,
    # the RoleBinding's subject namespaced too (kustomize sorts by kind, so compare by name)
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    def by_name(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(objects, key=lambda o: (o["kind"], o["metadata"]["name"]))

    built = list(yaml.safe_load_all(done.stdout))
    rendered_now = render(load_config(EXAMPLE), overlay=overlay, namespace="loom")
    assert by_name(built) == by_name(rendered_now), RENDER_AGAIN


def test_every_file_of_the_tree_opens_with_a_comment_line() -> None:
    files = tree(example(), namespace="loom")

    assert [path for path, text in files.items() if not text.startswith("# ")] == []
    assert len(files) == 19  # 14 objects + kustomization, cpu: patch + kustomization, gpu: same


def test_write_tree_writes_the_tree_and_the_source_beside_it(tmp_path: Path) -> None:
    source = EXAMPLE.read_text(encoding="utf-8")
    files = tree(example(), namespace="loom")

    written = write_tree(example(), tmp_path, namespace="loom", source=source)

    assert sorted(written) == sorted([tmp_path / "loom.yaml", *(tmp_path / p for p in files)])
    for relative, text in files.items():
        assert (tmp_path / relative).read_text(encoding="utf-8") == text, relative
    assert (tmp_path / "loom.yaml").read_text(encoding="utf-8") == source


# --- loom deploy render ------------------------------------------------------------------------


@pytest.fixture
def no_loom_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOM_CONFIG", raising=False)


@pytest.mark.usefixtures("no_loom_config")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_prints_the_objects_of_the_overlay_asked_for(
    overlay: Overlay, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["deploy", "render", "--config", str(EXAMPLE), "--overlay", overlay])

    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert code == 0
    assert printed == render(example(), overlay=overlay, namespace="loom")


@pytest.mark.usefixtures("no_loom_config")
def test_render_picks_the_gpu_overlay_for_a_config_with_a_gpu_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["deploy", "render", "--config", str(EXAMPLE)])

    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert code == 0
    assert printed == render(example(), overlay="gpu", namespace="loom")
    assert printed != render(example(), overlay="cpu", namespace="loom")


@pytest.mark.usefixtures("no_loom_config")
def test_render_picks_the_cpu_overlay_for_a_config_without_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "loom.yaml"
    path.write_text("models:\n  - {name: minilm, source: minilm}\n", encoding="utf-8")

    code = main(["deploy", "render", "--config", str(path), "--namespace", NAMESPACE])

    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert code == 0
    assert printed == render(load_config(path), overlay="cpu", namespace=NAMESPACE)


@pytest.mark.usefixtures("no_loom_config")
def test_render_of_a_config_with_a_key_in_clear_exits_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data["server"] = {"api_keys": ["k" * 20]}
    path = tmp_path / "loom.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")

    code = main(["deploy", "render", "--config", str(path), "--overlay", "gpu"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("error: cannot render: server.api_keys: keys in clear")
    assert "k" * 20 not in err  # the key itself is never echoed


def test_a_tree_of_a_config_without_gpus_holds_the_cpu_overlay_only_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "loom.yaml"
    path.write_text("models:\n  - {name: minilm, source: minilm}\n", encoding="utf-8")

    code = main(["deploy", "render", "--config", str(path), "--out", str(tmp_path / "k8s")])

    err = capsys.readouterr().err
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "k8s" / "overlays").iterdir()) == ["cpu"]
    assert err.startswith("no gpu overlay: cannot render: the gpu overlay reserves GPUs")


def test_a_cuda_model_without_num_gpus_is_refused_since_it_would_land_on_a_cpu_pod() -> None:
    def cuda_without_gpus(data: dict) -> None:
        data["models"][1]["num_gpus"] = 0

    config = changed_example(cuda_without_gpus)

    with pytest.raises(RenderError, match="chat: device cuda with num_gpus 0"):
        render(config, overlay="gpu")
    render(config, overlay="cpu")  # the cpu overlay moves it to the CPU: it renders


@pytest.mark.usefixtures("no_loom_config")
def test_a_tree_of_the_bundled_default_holds_the_default_config_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["deploy", "render", "--out", str(tmp_path)])

    capsys.readouterr()
    written = yaml.safe_load((tmp_path / "loom.yaml").read_text(encoding="utf-8"))
    assert code == 0
    assert parse_config(written) == default_config()  # not an empty file


def test_with_a_grpc_port_the_gateway_pods_service_and_open_policy_carry_it_too() -> None:
    config = changed_example(lambda data: data.setdefault("server", {}).update(grpc_port=8001))
    objects = render(config, overlay="cpu", namespace=NAMESPACE)
    raycluster = find(objects, "RayCluster")

    service_ports = {
        p["name"]: (p["port"], p["targetPort"]) for p in find(objects, "Service")["spec"]["ports"]
    }
    (gateway,) = group_spec(raycluster, "gateway")["template"]["spec"]["containers"]
    open_rules = [
        rule
        for policy in objects
        if policy["kind"] == "NetworkPolicy"
        for rule in policy["spec"]["ingress"]
        if "from" not in rule
    ]

    assert service_ports == {"http": (config.server.port, "http"), "grpc": (8001, "grpc")}
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {
        "http": config.server.port,
        "grpc": 8001,
    }
    assert open_rules == [
        {
            "ports": [
                {"protocol": "TCP", "port": config.server.port},
                {"protocol": "TCP", "port": 8001},
            ]
        }
    ]
