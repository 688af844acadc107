"""``loom serve``, ``loom status`` and ``loom top``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from models.errors import StoreError
from models.settings import LoomEnv
from serving import keys_cli
from serving.config import (
    ConfigError,
    LoomConfig,
    default_config,
    in_cluster,
    load_config,
    with_overrides,
)
from serving.config.ray_head import joins_a_cluster


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    serve_cmd = subparsers.add_parser(
        "serve", help="serve models over HTTP (foreground; Ctrl-C stops)"
    )
    serve_cmd.add_argument("--config", type=str, default=None, help="serving config (YAML)")
    serve_cmd.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    serve_cmd.add_argument(
        "--address",
        default=None,
        help="join the Ray cluster at HOST:PORT (its GCS) instead of starting a local Ray; "
        "same as RAY_ADDRESS",
    )
    serve_cmd.add_argument(
        "--in-cluster",
        action="store_true",
        help="run as the control plane of the Kubernetes cluster the config's cluster: "
        "section describes (the head pod's command; docs/deploy.md)",
    )
    serve_cmd.set_defaults(func=run_serve)

    status_cmd = subparsers.add_parser(
        "status", help="what a running server has deployed, and whether it is ready"
    )
    add_server_options(status_cmd)
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    status_cmd.set_defaults(func=run_status)

    top_cmd = subparsers.add_parser(
        "top", help="a live table of each model's replicas, traffic, latency and queue (q quits)"
    )
    add_server_options(top_cmd)
    top_cmd.add_argument(
        "--interval-s",
        type=positive_seconds,
        default=1.0,
        help="seconds between redraws (default 1)",
    )
    top_cmd.set_defaults(func=run_top)
    keys_cli.add_commands(subparsers)


DEFAULT_URL = "http://127.0.0.1:8000"


def add_server_options(command: argparse.ArgumentParser) -> None:
    """``--url`` and ``--cacert``: where a client command finds the running server and
    what it trusts there (``loom status``, ``loom top``)."""
    command.add_argument("--url", default=None, help=f"server address (default {DEFAULT_URL})")
    command.add_argument(
        "--cacert",
        default=None,
        help="CA certificate (PEM) to trust for an https --url, e.g. a self-signed server's "
        "own certificate (default: $LOOM_CA_FILE, else the system's CAs)",
    )


def server_url(args: argparse.Namespace) -> str:
    """The server's base address from ``--url``, without a trailing slash."""
    return str(args.url or DEFAULT_URL).rstrip("/")


def client_api_key(env: LoomEnv) -> str | None:
    """The key a client command sends as its bearer token: the first of ``LOOM_API_KEYS``."""
    return env.api_keys[0] if env.api_keys else None


def client_cacert(args: argparse.Namespace, env: LoomEnv) -> str | None:
    """``--cacert``, else ``LOOM_CA_FILE``."""
    return args.cacert or env.ca_file


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0: {text}")
    return seconds


class StopRequest:
    """Set by SIGINT/SIGTERM. The handler only flips a flag: taking a lock in a signal handler
    (``threading.Event.set``) deadlocks if the signal lands while the main thread holds it.
    After the first signal the default action returns, so a second Ctrl-C forces the exit."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(
            signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler
        )


def resolve_config(args: argparse.Namespace, env: LoomEnv) -> LoomConfig:
    path = args.config or env.config_path
    config = load_config(Path(path)) if path else default_config()
    if getattr(args, "in_cluster", False):
        config = in_cluster(config)
    return with_overrides(config, env=env, host=args.host, port=args.port)


def loopback_ray_env(config: LoomConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment that makes the Ray ``loom serve`` starts listen on 127.0.0.1 only, when
    Loom's own host is loopback and no ``RAY_ADDRESS`` names a cluster to join.

    Ray takes its node address from the network unless it runs "without cluster support",
    and binds every port to it (GCS, raylet, workers, agents: seen here on the machine's
    routable address); this switch makes that address 127.0.0.1. It is read when Ray is
    imported, so it must be set before that. A Ray of several nodes needs routable
    addresses: bind Loom to one (with keys and TLS), or join a cluster with RAY_ADDRESS."""
    if not config.server.is_loopback or joins_a_cluster(environ):
        return {}
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def client_ssl_context(cacert: str | None) -> ssl.SSLContext | None:
    """What ``loom status`` and ``loom top`` trust for https: ``cacert`` as well as the
    system's CAs; None (urllib's default context) without one."""
    return ssl.create_default_context(cafile=cacert) if cacert else None


def configure_logging() -> None:
    """What ``loom serve`` prints of Loom's own logs: rollout steps, model loads, warnings and
    errors (with request or job ids), each line ``loom: ...`` on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("loom: %(message)s"))
    for package in ("models", "training", "serving"):
        package_logger = logging.getLogger(package)
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)


def run_serve(args: argparse.Namespace) -> int:
    configure_logging()
    if args.address:  # read by Ray's init, and by Loom to know it joins (``joins_a_cluster``)
        os.environ["RAY_ADDRESS"] = args.address
    env = LoomEnv.from_environ()
    try:
        config = resolve_config(args, env)
    except ConfigError as exc:  # refused before anything heavy is imported: at once
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in loopback_ray_env(config, os.environ).items():  # before Ray's import
        os.environ.setdefault(key, value)
    # read above: Ray's processes (replicas included) inherit this environment, keys not
    os.environ.pop("LOOM_API_KEYS", None)
    from serving.gateway.http_server import PortUnavailable, bind_socket
    from serving.run_record import RunRecords

    # a run on this home killed without stopping may have left processes holding the port
    RunRecords(env.run_dir).clean_dead_runs()
    try:  # a taken port, too, is said before the heavy imports (LoomServer checks it again)
        if not joins_a_cluster():  # joining a cluster: the port may be Loom's gateway's
            for port in config.server.listen_ports:
                bind_socket(config.server.host, port).close()
    except PortUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from serving.server import LoomServer  # imports Ray and torch (seconds): only when serving

    server = LoomServer(config, env)
    stop = StopRequest()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop.handle)
    try:
        server.start()
    except (StoreError, ConfigError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        return 1
    host, port = config.server.host, config.server.port
    names = ", ".join(m.name for m in config.models)
    auth = "on" if config.server.keys_on else "off"
    scheme = config.server.scheme
    if server.role == "standby":
        print(
            "loom: standing by (another loom serve holds the control plane); it takes over "
            "if that one stops answering. Ctrl-C stops",
            flush=True,
        )
    else:
        grpc_port = config.server.grpc_port
        grpc = "" if grpc_port is None else f" and gRPC on {host}:{grpc_port}"
        print(
            f"loom: serving {names} on {scheme}://{host}:{port}{grpc} (API keys {auth}); "
            "Ctrl-C stops",
            flush=True,
        )
    try:
        while not stop.requested:
            time.sleep(0.2)
    finally:
        print("loom: shutting down (Ctrl-C again to force)", flush=True)
        server.stop()
    return 0


def run_status(args: argparse.Namespace) -> int:
    env = LoomEnv.from_environ()
    url = server_url(args) + "/v1/status"
    request = urllib.request.Request(url)
    if (key := client_api_key(env)) is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        context = client_ssl_context(client_cacert(args, env))
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            status = json.load(response)
    except urllib.error.HTTPError as exc:
        print(
            f"error: {url} answered {exc.code}: {exc.read().decode(errors='replace')}",
            file=sys.stderr,
        )
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: no Loom server at {url} ({exc})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"application: {status['application']}")
    print(f"{'DEPLOYMENT':<28} {'STATUS':<12} {'RUNNING':>7}  READY")
    for name, dep in sorted(status["deployments"].items()):
        ready = "yes" if dep.get("ready", dep["running_replicas"] > 0) else "no"
        print(f"{name:<28} {dep['status']:<12} {dep['running_replicas']:>7}  {ready}")
        if dep.get("waiting_for"):
            print(f"  waiting: {dep['waiting_for']}")
        for version, app in sorted(dep.get("versions", {}).items()):
            label = f"  @{version} weight {app['weight']:g}"
            print(f"{label:<28} {app['status']:<12} {app['running_replicas']:>7}")
    return 0


def run_top(args: argparse.Namespace) -> int:
    env = LoomEnv.from_environ()
    try:
        context = client_ssl_context(client_cacert(args, env))
    except OSError as exc:  # an unreadable or malformed --cacert (ssl.SSLError is an OSError)
        print(f"error: cannot use the CA certificate: {exc}", file=sys.stderr)
        return 1
    from serving.top import GatewayClient
    from serving.top import run_top as run_top_loop  # rich's import: only when top runs

    client = GatewayClient(server_url(args), api_key=client_api_key(env), ssl_context=context)
    return run_top_loop(client, interval_s=args.interval_s)
