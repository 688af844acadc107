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


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (from its metadata), None where it is absent."""
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
    smi = nvidia_smi()
    driver = smi[0]["driver_version"] if smi else None
    return {"names": names, "count": len(names), "driver": driver, "cuda": torch.version.cuda}


def nvidia_smi() -> list[dict[str, str]] | None:
    """``nvidia-smi --query-gpu=name,driver_version``, one dict per GPU; None without it."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    rows = [line.rsplit(",", 1) for line in done.stdout.strip().splitlines() if "," in line]
    return [{"name": name.strip(), "driver_version": driver.strip()} for name, driver in rows]


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
        "versions": {package: package_version(package) for package in _PACKAGES},
        "git_commit": _git(repo, "rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "env_flags": env_flags(os.environ),
        **({"gpu": gpu_facts()} if gpu else {}),
    }
