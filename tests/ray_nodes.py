"""Ray nodes started as an operator (or KubeRay) starts them, ``ray start ... --block``, each
in a process group of its own, and ended with everything they started: for the tests that
need a Ray cluster outliving a `loom serve` (hot standby) or of several nodes (the cluster
rehearsal). The temp folder must be short: Ray's socket paths fit in 107 bytes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from serving.run_record import end_processes, session_processes


def ray_temp_dir() -> Path:
    """A fresh, short temp folder for one cluster's sessions."""
    return Path(tempfile.mkdtemp(prefix="loom-ray-", dir="/tmp"))


def start_ray_node(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """``ray start *args --block``, its output discarded, in a process group of its own."""
    ray = Path(sys.executable).with_name("ray")
    return subprocess.Popen(
        [str(ray), "start", *args, "--block"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_ray_node(node: subprocess.Popen, *, graceful: bool = True) -> None:
    """SIGTERM to the node's group (``--block``: ray stops what it started), SIGKILL after
    60 s; not ``graceful``: SIGKILL at once (``end_cluster`` then ends what is left)."""
    if node.poll() is not None:
        return
    if not graceful:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=10)
        return
    os.killpg(node.pid, signal.SIGTERM)
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=10)


def end_cluster(temp: Path) -> None:
    """End what the stops left of the cluster whose sessions live in ``temp`` (its
    processes only), and remove the folder."""
    for session in temp.glob("session_2*"):
        end_processes(session_processes(str(session)))
    shutil.rmtree(temp, ignore_errors=True)
