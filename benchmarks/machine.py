"""Facts about the machine and checkout a benchmark ran on, for its JSON.

Versions are read from package metadata (no heavy imports); the git commit is ``None`` outside
a repository or before the first commit.

    facts = machine_facts(Path("."))
    facts["cpu_count"], facts["git_commit"], facts["env_flags"]
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_FLAG_PREFIXES = ("RAY_", "OMP_", "MKL_", "TORCH_", "CUDA_VISIBLE_DEVICES")
"""Environment variables that change how the servers run, recorded when set. (``LOOM_*`` ones
are not passed on to the servers under test; see ``processes.child_env``.)"""

_PACKAGES = ("torch", "ray", "transformers", "fastapi", "uvicorn", "numpy")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def env_flags(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` with an ``ENV_FLAG_PREFIXES`` prefix, sorted by name."""
    return {key: environ[key] for key in sorted(environ) if key.startswith(ENV_FLAG_PREFIXES)}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def load_average_1m() -> float | None:
    """The 1-minute load average (runnable processes), ``None`` where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def gpu_facts() -> dict[str, Any] | None:
    """The GPUs torch sees (names), the driver (``nvidia-smi``) and torch's CUDA version;
    ``None`` on a machine without CUDA. Imports torch, so only called where it is loaded."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    driver = None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode == 0 and done.stdout.strip():
            driver = done.stdout.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"names": names, "count": len(names), "driver": driver, "cuda": torch.version.cuda}


def machine_facts(repo: Path, *, gpu: bool = False) -> dict[str, Any]:
    """CPU, package versions, git commit, UTC date and the env flags every server inherits;
    with ``gpu``, the GPUs too (``gpu_facts``: imports torch)."""
    status = _git(repo, "status", "--porcelain")
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "load_avg_1m": load_average_1m(),
        "versions": {package: _version(package) for package in _PACKAGES},
        "git_commit": _git(repo, "rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "env_flags": env_flags(os.environ),
        **({"gpu": gpu_facts()} if gpu else {}),
    }
