"""A multi-node rehearsal of the Kubernetes layout on this machine (issue 15, point 5).

The cluster is made as KubeRay would make it, with ``ray start``: a head with ``--num-cpus=0``
(no replica may land there) and one worker node with CPUs and the gateway's resource (here
it plays both a gateway pod and a CPU worker pod). Each worker node's monitoring sidecar is
its own process, as the pod's sidecar container is. ``loom serve --address ... --in-cluster``
then joins the cluster as the head pod's command does.

What this proves: the control plane runs from outside the worker; every replica, the
gateway's too, lands on the worker and none on the head; the gateway finds the sidecar of
each node that hosts replicas through Ray's node table (no sidecar actor); that sidecar
reports every replica on its node; the gateway answers. What it cannot prove: anything of
Kubernetes itself (images, probes, volumes, policies: those are checked against the schemas
in tests/unit/deploy), and nodes on separate machines (both nodes share 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from ray_nodes import end_cluster, ray_temp_dir, start_ray_node, stop_ray_node
from waiting import wait_until

from serving.config.cluster import GATEWAY_RESOURCE
from serving.config.ray_head import SERVE_ENV
from serving.monitoring.scrape import fetch_text, sidecar_urls

REPO = Path(__file__).resolve().parents[2]
NO_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch to 127.0.0.1 only: it refuses a second node, so it is off here. The nodes
then take the machine's address, as pods take theirs; token authentication (``TOKEN``)
keeps other clients out, as it does on Kubernetes."""
TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
"""Ray's token authentication, the token in every node's and driver's environment: what
KubeRay's ``authOptions: {mode: token}`` (rendered) gives each pod."""
READY_S = 300.0

pytestmark = pytest.mark.timeout(600)


@dataclass
class Cluster:
    address: str
    temp: Path
    processes: list[subprocess.Popen]


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (NO_LOOPBACK, "LOOM_API_KEYS")}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def cluster(free_port: Callable[[], int]) -> Iterator[Cluster]:
    """A head (no CPUs) and one worker node (2 CPUs, one gateway slot), as KubeRay starts
    them; every process of the cluster ended after the test. The temp folder is short: Ray's
    socket paths must fit in 107 bytes."""
    port = free_port()
    temp = ray_temp_dir()
    env = {**_environ(), **SERVE_ENV, **TOKEN}
    address = f"127.0.0.1:{port}"
    head = start_ray_node(
        "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", env=env,
    )  # fmt: skip
    running = Cluster(address, temp, [head])
    try:
        wait_until(lambda: _listening(port), "the head's GCS listening")
        worker = start_ray_node(
            f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
            f"--resources={json.dumps({GATEWAY_RESOURCE: 1})}", "--disable-usage-stats",
            env=env,
        )  # fmt: skip
        running.processes.append(worker)
        yield running
    finally:
        for process in reversed(running.processes):  # a test's cluster: no graceful stop
            stop_ray_node(process, graceful=False)
        end_cluster(temp)


def cluster_table(address: str) -> dict[str, object]:
    """The cluster as Ray's GCS sees it, from a driver of its own: the head node's id, the
    alive nodes' ids and addresses, and every alive actor's class and node."""
    script = """
import json, sys
import ray
import ray._private.state as state
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
head = next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"])
actors = [
    {"class": a["ActorClassName"], "node": a["Address"]["NodeID"]}
    for a in state.actors().values() if a["State"] == "ALIVE"
]
addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
print(json.dumps({"head": head, "nodes": addresses, "actors": actors}))
"""
    env = {**_environ(), **TOKEN}
    done = subprocess.run(
        [sys.executable, "-c", script, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    table: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return table


def replicas_reported(metrics_url: str, model: str) -> set[str]:
    """The replicas of ``model`` a sidecar reports (its ``replica`` labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = fetch_text(metrics_url)
    return {
        sample.labels["replica"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == model and sample.labels.get("replica")
    }


def test_replicas_land_on_the_worker_and_its_sidecar_reports_them_while_the_gateway_answers(
    cluster: Cluster, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    http_port, sidecar_port = free_port(), free_port()
    stats = tmp_path / "stats"  # the worker pod's own folder (an emptyDir on Kubernetes)
    stats.mkdir()
    config = {
        "training": {"enabled": False},
        "models": [
            {"name": "minilm", "source": "minilm", "task": "embed", "num_cpus": 0.5,
             "replicas": 2, "torch_threads": 1}
        ],
        "cluster": {
            "gateway": {"replicas": 1},
            "stats_dir": str(stats),
            "sidecar_port": sidecar_port,
        },
    }  # fmt: skip
    config_path = tmp_path / "loom.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**_environ(), "LOOM_HOME": str(tmp_path / "home"), **TOKEN}
    tables: list[dict[str, object]] = []

    def both_nodes_up() -> bool:  # the worker joins after the head is up
        tables.append(cluster_table(cluster.address))
        return len(tables[-1]["nodes"]) == 2  # type: ignore[arg-type]

    wait_until(both_nodes_up, "the head and the worker node alive")
    before = tables[-1]
    nodes = before["nodes"]
    assert isinstance(nodes, dict)
    (worker,) = [node for node in nodes if node != before["head"]]
    worker_ip = nodes[worker]
    sidecar = subprocess.Popen(  # the worker pod's sidecar container, at the node's address
        [sys.executable, "-m", "serving.monitoring.sidecar", f"--stats-dir={stats}",
         f"--host={worker_ip}", f"--port={sidecar_port}", "--node=worker-0"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    cluster.processes.append(sidecar)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(  # the head pod's command (--host: this machine's loopback)
            [sys.executable, "-m", "loom", "serve", "--config", str(config_path),
             "--address", cluster.address, "--in-cluster", "--host", "127.0.0.1",
             "--port", str(http_port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:

        def ready() -> bool:
            if serve.poll() is not None:
                raise AssertionError(f"loom serve exited:\n{log.read_text()[-4000:]}")
            try:
                return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the gateway ready", deadline_s=READY_S)

        answer = httpx.post(
            f"{url}/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"]) == 2

        actors = cluster_table(cluster.address)["actors"]
        assert isinstance(actors, list)
        replicas = [a for a in actors if str(a["class"]).startswith("ServeReplica:")]
        # 2 minilm replicas + 1 gateway, every one on the worker, none on the head
        assert len(replicas) == 3, replicas
        assert {a["node"] for a in replicas} == {worker}
        assert not [a for a in actors if a["class"] == "SidecarActor"]  # containers, not actors

        # the gateway lists one sidecar, the worker's (the head has no CPU: no replica, no
        # sidecar), and that sidecar reports both minilm replicas
        urls = sidecar_urls(url)
        assert urls == [f"http://{worker_ip}:{sidecar_port}/metrics"]
        wait_until(
            lambda: len(replicas_reported(urls[0], "minilm")) == 2,
            "the worker's sidecar reporting both replicas",
        )
    finally:
        # killed, as a deleted head pod is: the cluster's teardown ends the replicas with it
        # (a graceful stop would spend half a minute deleting Serve's apps one by one)
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(timeout=10)
