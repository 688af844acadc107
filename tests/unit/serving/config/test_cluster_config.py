"""The ``cluster:`` section and what ``loom serve --in-cluster`` makes of it: one gateway per
gateway pod, sidecars as containers found through Ray's node table, the pod's own stats
folder and keys file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import ray

from loom.cli import build_parser
from models.settings import LoomEnv
from serving.config import ConfigError, in_cluster, parse_config
from serving.config.cluster import GATEWAY_RESOURCE
from serving.config.server import ServerConfig
from serving.monitoring import sidecar_actor
from training.k8s_leases import pod_namespace

MODELS = [{"name": "minilm", "source": "minilm"}]


def test_in_cluster_serves_one_gateway_per_gateway_pod_and_reads_sidecar_containers() -> None:
    config = parse_config(
        {
            "models": MODELS,
            "cluster": {"gateway": {"replicas": 3}, "sidecar_port": 9555},
        }
    )

    running = in_cluster(config)

    assert running.server.host == "0.0.0.0"  # the Service reaches each gateway pod
    assert running.server.gateway_replicas == 3
    assert running.server.gateway_node_resource == GATEWAY_RESOURCE
    monitoring = running.monitoring
    assert monitoring.sidecar_actor is False
    assert (monitoring.sidecar_port, monitoring.sidecar_host) == (9555, "0.0.0.0")
    assert monitoring.stats_dir == Path("/var/run/loom/stats")
    assert running.models == config.models  # the models are served as configured


def test_in_cluster_without_a_cluster_section_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="cluster: section"):
        in_cluster(parse_config({"models": MODELS}))


def test_sidecar_containers_need_a_port_to_be_found_at() -> None:
    with pytest.raises(ConfigError, match="sidecar_port"):
        parse_config({"models": MODELS, "monitoring": {"sidecar_actor": False}})


def test_two_gateways_need_a_resource_that_keeps_them_on_separate_nodes() -> None:
    with pytest.raises(ValueError, match="gateway_node_resource"):
        ServerConfig(gateway_replicas=2)
    assert ServerConfig(gateway_replicas=2, gateway_node_resource="g").gateway_replicas == 2


@pytest.mark.parametrize(
    ("cluster", "field"),
    [
        ({"stats_dir": "/var/lib/loom/stats"}, "node-local"),  # under home: the shared volume
        ({"stats_dir": "stats"}, "absolute"),
        ({"cpu_workers": {"replicas": 1, "min_replicas": 2}}, "min_replicas <= replicas"),
        ({"head": {"cpu": "two"}}, "quantity"),
        ({"name": "Loom_Prod"}, "lower case"),
        ({"gpu_workers": {"gpus": 0}}, "gpus"),
    ],
)
def test_a_cluster_section_the_cluster_could_not_run_is_refused_naming_the_field(
    cluster: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_config({"models": MODELS, "cluster": cluster})


def test_the_keys_file_is_the_homes_unless_loom_keys_file_names_another(tmp_path: Path) -> None:
    home = LoomEnv.from_environ({"LOOM_HOME": str(tmp_path)})
    named = LoomEnv.from_environ({"LOOM_HOME": str(tmp_path), "LOOM_KEYS_FILE": "/etc/k.json"})

    assert home.keys_file == tmp_path.resolve() / "keys.json"
    assert named.keys_file == Path("/etc/k.json")


def test_the_lease_namespace_is_the_pods_own_and_default_outside_a_pod(tmp_path: Path) -> None:
    account = tmp_path / "namespace"
    account.write_text("prod-ml\n")

    assert pod_namespace(account) == "prod-ml"
    assert pod_namespace(tmp_path / "missing") == "default"


def test_sidecar_containers_are_found_on_every_live_node_that_can_run_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = [
        {"NodeID": "h" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"node:__internal_head__": 1.0}},  # the head: num-cpus 0
        {"NodeID": "g" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2",
         "Resources": {GATEWAY_RESOURCE: 1.0}},  # a gateway pod: num-cpus 0
        {"NodeID": "c" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.3",
         "Resources": {"CPU": 4.0}},
        {"NodeID": "x" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.4",
         "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {"NodeID": "d" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.5",
         "Resources": {"CPU": 4.0}},  # gone
    ]  # fmt: skip
    monkeypatch.setattr(ray, "nodes", lambda: nodes)

    found = sidecar_actor.node_sidecars(9470)

    assert [s["address"] for s in found] == ["10.0.0.3:9470", "10.0.0.4:9470"]
    assert [s["node"] for s in found] == ["c" * 16, "x" * 16]


def test_loom_serve_takes_a_cluster_address_and_in_cluster() -> None:
    args = build_parser().parse_args(["serve", "--address", "10.0.0.1:6379", "--in-cluster"])

    assert (args.address, args.in_cluster) == ("10.0.0.1:6379", True)


def test_sidecar_targets_stay_as_last_read_while_the_node_table_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = {"NodeID": "c" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.3",
            "Resources": {"CPU": 4.0}}  # fmt: skip
    answers: list[object] = [[node], RuntimeError("GCS unavailable")]

    def nodes() -> list[dict[str, Any]]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    monkeypatch.setattr(ray, "nodes", nodes)
    targets = sidecar_actor.NodeSidecars(9470)

    first = asyncio.run(targets())
    second = asyncio.run(targets())

    assert [t["address"] for t in first] == ["10.0.0.3:9470"]
    assert second == first
