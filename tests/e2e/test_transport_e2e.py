"""Transport and keys on a real ``loom serve`` (the keyed server, on 127.0.0.1): no process of
its Ray session listens beyond loopback, and neither API key appears in Ray's state (the actor
table, Serve's status and its checkpoints in the GCS, where deployment arguments live), the
server's logs (its own and every Ray log of the session), ``/metrics`` or error bodies."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from loom_process import API_KEY, REPO, LoomProcess

from serving.run_record import session_processes

psutil = pytest.importorskip("psutil", reason="psutil lists each process's sockets")

CONFIG_KEY = "config-key-0123456789"
"""The key the keyed server's config file holds (``_start_keyed`` in conftest)."""


def _session(loom: LoomProcess) -> str:
    session = loom.ray_session()
    if session is None:
        pytest.skip("the server's run record names no Ray session of its own")
    return session


def _listening(pid: int) -> list[str]:
    """The addresses process ``pid`` listens on (TCP)."""
    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except psutil.NoSuchProcess:
        return []
    return [c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN]


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def test_no_process_of_the_session_listens_beyond_loopback(keyed_server: LoomProcess) -> None:
    pids = [keyed_server.process.pid, *session_processes(_session(keyed_server))]
    try:
        found = {pid: _listening(pid) for pid in pids}
    except psutil.AccessDenied:
        pytest.skip("this platform does not show another process's sockets")
    listening = {pid: addresses for pid, addresses in found.items() if addresses}
    # the gateway's HTTP port and Ray's GCS, raylet, workers and agents: several, all loopback
    assert len(listening) >= 3, found
    # Ray 2.60's Serve replicas open their inter-deployment gRPC server on "[::]:0",
    # hard-coded (ray/serve/_private/replica.py, _on_initialized): the one known exception,
    # named in docs/security.md. Every other Ray process listens on loopback only.
    public = {
        f"{pid} {_cmdline(pid)[:100]}": [a for a in addrs if not _is_loopback(a)]
        for pid, addrs in listening.items()
        if not SERVE_REPLICA_TITLE.search(_cmdline(pid))
    }
    assert not any(public.values()), {name: a for name, a in public.items() if a}


SERVE_REPLICA_TITLE = re.compile(r"^ray::(ServeReplica|SERVE_REPLICA|[\w.~-]+@[\w.-]+:)")
"""A Serve replica's process title: ``ray::ServeReplica:...`` while idle, ``ray::<app>:<deployment>
.<method>`` (``ray::digits@1:model-digits.perform_graceful_shutdown``) while it runs a task."""


RAY_STATE_DUMP = """
import json, sys
import ray
from ray import serve
from ray.experimental import internal_kv

ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
parts = [repr(ray._private.state.actors())]
parts.append(repr(serve.status()))
for namespace in ("serve", None):
    for key in internal_kv._internal_kv_list(b"", namespace=namespace) or []:
        parts.append(repr(key) + repr(internal_kv._internal_kv_get(key, namespace=namespace)))
print(json.dumps(parts))
"""


def _ray_state(session: str) -> str:
    """Ray's actor table, Serve's status and every key-value entry of the GCS (Serve keeps
    its checkpoints, deployment arguments included, there), from a driver joined to the
    server's Ray."""
    gcs = [pid for pid in session_processes(session) if "gcs_server" in _cmdline(pid)]
    if not gcs:
        pytest.skip("no GCS process of the session found")
    ports = [
        c.laddr.port
        for c in psutil.Process(gcs[0]).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert len(ports) == 1, ports  # the GCS's one gRPC port (its flag says 0: chosen at start)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the server's node: 127.0.0.1
    env.pop("LOOM_API_KEYS", None)
    # the server's local Ray asks for the token it wrote to ~/.ray/auth_token (Ray's default
    # for a new local cluster); a driver given an address sends it only in token mode
    env["RAY_AUTH_MODE"] = "token"
    done = subprocess.run(
        [sys.executable, "-c", RAY_STATE_DUMP, f"127.0.0.1:{ports[0]}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return "\n".join(json.loads(done.stdout.strip().splitlines()[-1]))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_no_key_in_logs_metrics_error_bodies_or_ray_environments(keyed_server: LoomProcess) -> None:
    url, keys = keyed_server.url, (API_KEY, CONFIG_KEY)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    bodies = [
        httpx.post(f"{url}/v1/embeddings", json={"model": "absent", "input": ["x"]}, headers=auth),
        httpx.post(f"{url}/v1/embeddings", json={"model": "minilm"}, headers=auth),
        httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}-wrong"}),
        httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {CONFIG_KEY}"}),
        httpx.post(f"{url}/v1/admin/models/minilm/promote", json={}, headers=auth),
        httpx.post(f"{url}/v1/jobs", json={"trainer": "nope"}, headers=auth),
    ]
    assert all(r.status_code >= 400 for r in bodies), [r.status_code for r in bodies]
    for answer in bodies:
        for key in keys:
            assert key not in answer.text, (answer.status_code, answer.text)
    metrics = httpx.get(f"{url}/metrics").text
    assert "loom_" in metrics
    for key in keys:
        assert key not in metrics
    session = _session(keyed_server)
    logs = [keyed_server.log, *(p for p in Path(session, "logs").rglob("*") if p.is_file())]
    for log in logs:
        text = log.read_bytes()
        for key in keys:
            assert key.encode() not in text, f"{key!r} in {log}"
    # Ray's processes did not inherit LOOM_API_KEYS (``loom serve``'s own /proc environ is the
    # block it started with, whatever it removed since: not Ray's)
    ray_pids = [pid for pid in session_processes(session) if pid != keyed_server.process.pid]
    assert ray_pids
    for pid in ray_pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert API_KEY.encode() not in environ, f"process {pid} {_cmdline(pid)[:80]}"


def test_no_key_in_ray_state(keyed_server: LoomProcess) -> None:
    state = _ray_state(_session(keyed_server))
    # the gateway's arguments were read (Serve's checkpoint in the GCS): its key digests are there
    assert "key_sha256" in state
    for key in (API_KEY, CONFIG_KEY):
        assert key not in state, "a key is in Ray's state"
