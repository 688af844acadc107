"""The HTTP servers the embeddings benchmark compares, each as a ``ServerSpec``.

- ``noop``: answers at once; measures the load generator alone.
- ``stack``: ``loom serve`` (Ray Serve, gateway, batching) on a fresh ``LOOM_HOME``.
- ``rayserve``: one Ray Serve deployment with ``@serve.batch`` behind HAProxy, what a Ray
  user writes instead of Loom (``benchmarks.rayserve_server``).
- ``plain``: FastAPI + uvicorn calling the engine one request at a time.

All four listen on a free 127.0.0.1 port and answer ``GET /v2/health/ready`` when ready.

    spec = stack_spec(work_dir=tmp, config_path=None, model_name="minilm", extra_env={})
    with ServerProcess(spec) as server: ...
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from benchmarks.processes import LOCALHOST, ServerSpec, child_env, free_port

READY_PATH = "/v2/health/ready"
EMBEDDINGS_PATH = "/v1/embeddings"


def stack_config(
    *,
    port: int,
    model_name: str,
    max_batch_size: int = 64,
    max_wait_ms: float = 10.0,
    num_cpus: int = 1,
    model_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The serving config the benchmark generates: one embedding model, batched, on the
    ``num_cpus`` cores the in-process engine had, laid out as ``loom serve``'s default lays
    them out: one single-threaded replica per core. ``model_overrides`` replace fields."""
    model = {
        "name": model_name,
        "source": model_name,
        "task": "embed",
        "replicas": num_cpus,
        "num_cpus": 1,
        "torch_threads": 1,
        "batching": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms},
    }
    return {
        "server": {"host": LOCALHOST, "port": port},
        "models": [model | dict(model_overrides or {})],
    }


def _module_server(name: str, module: str, work_dir: Path, ready_timeout_s: float) -> ServerSpec:
    """``python -m MODULE --port P`` on a free port."""
    port = free_port()
    return ServerSpec(
        name=name,
        argv=(sys.executable, "-m", module, "--port", str(port)),
        port=port,
        ready_path=READY_PATH,
        log_dir=work_dir / "logs",
        env=child_env({"PYTHONUNBUFFERED": "1"}),
        ready_timeout_s=ready_timeout_s,
    )


def noop_spec(*, work_dir: Path) -> ServerSpec:
    return _module_server("noop", "benchmarks.noop_server", work_dir, ready_timeout_s=30.0)


def plain_spec(*, work_dir: Path, ready_timeout_s: float) -> ServerSpec:
    return _module_server("plain", "benchmarks.plain_server", work_dir, ready_timeout_s)


def stack_spec(
    *,
    work_dir: Path,
    config_path: Path | None,
    model_name: str,
    extra_env: Mapping[str, str],
    ready_timeout_s: float,
    max_batch_size: int = 64,
    max_wait_ms: float = 10.0,
    num_cpus: int = 1,
    model_overrides: Mapping[str, Any] | None = None,
) -> ServerSpec:
    """``loom serve`` on a free port with ``LOOM_HOME`` under ``work_dir``.

    Without ``config_path`` a config for ``model_name`` is written to ``work_dir``; with one,
    that file is used as is and ``--host``/``--port`` on the command line override its server.
    ``extra_env`` (e.g. Ray Serve flags) goes to this subprocess only; ``model_overrides``
    change fields of the generated model config.
    """
    port = free_port()
    if config_path is None:
        config_path = work_dir / "stack.yaml"
        config = stack_config(
            port=port,
            model_name=model_name,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            num_cpus=num_cpus,
            model_overrides=model_overrides,
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config))
    home = work_dir / "loom_home"
    home.mkdir(parents=True, exist_ok=True)
    return ServerSpec(
        name="stack",
        argv=(
            sys.executable,
            "-m",
            "loom",
            "serve",
            "--config",
            str(config_path),
            "--host",
            LOCALHOST,
            "--port",
            str(port),
        ),  # fmt: skip
        port=port,
        ready_path=READY_PATH,
        log_dir=work_dir / "logs",
        env=child_env({"LOOM_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra_env}),
        ready_timeout_s=ready_timeout_s,
        stop_grace_s=60.0,
    )


def rayserve_spec(
    *,
    work_dir: Path,
    ready_timeout_s: float,
    replicas: int,
    max_batch_size: int,
    batch_wait_ms: float,
) -> ServerSpec:
    """``benchmarks.rayserve_server`` on a free port: ``replicas`` single-threaded replicas,
    ``@serve.batch`` of at most ``max_batch_size`` waiting at most ``batch_wait_ms``. Its ready
    answer names the ingress that served (``haproxy``, or ``proxy`` if HAProxy failed)."""
    port = free_port()
    return ServerSpec(
        name="rayserve",
        argv=(
            sys.executable,
            "-m",
            "benchmarks.rayserve_server",
            "--port",
            str(port),
            "--replicas",
            str(replicas),
            "--max-batch-size",
            str(max_batch_size),
            "--batch-wait-ms",
            f"{batch_wait_ms:g}",
        ),  # fmt: skip
        port=port,
        ready_path=READY_PATH,
        log_dir=work_dir / "logs",
        env=child_env({"PYTHONUNBUFFERED": "1"}),
        ready_timeout_s=ready_timeout_s,
        # Serve drains each replica on shutdown, then Ray stops, then HAProxy is reaped
        stop_grace_s=60.0,
    )
