"""``loom deploy``: render Loom's config into Kubernetes objects, apply them, watch them come
up, report on them and delete them (docs/deploy.md).

    loom deploy render --overlay gpu --config loom.yaml > loom.k8s.yaml
    loom deploy apply --overlay gpu --config loom.yaml
    loom deploy status
    loom deploy delete --config loom.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.settings import LoomEnv
from serving.config import ConfigError, LoomConfig, default_config, load_config

if TYPE_CHECKING:
    from deploy.render import Overlay

DEFAULT_NAMESPACE = "loom"
READY_TIMEOUT_S = 900.0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    deploy = subparsers.add_parser(
        "deploy", help="run Loom on Kubernetes (KubeRay): render, apply, status, delete"
    )
    commands = deploy.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)

    render = commands.add_parser("render", help="print the manifests (YAML, ---separated)")
    _config_options(render)
    render.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write a kustomize tree there instead (base/, overlays/cpu, overlays/gpu, the "
        "config beside them)",
    )
    render.set_defaults(func=run_render)

    apply = commands.add_parser("apply", help="apply the manifests and wait until ready")
    _config_options(apply)
    _cluster_options(apply)
    apply.add_argument(
        "--timeout-s",
        type=float,
        default=READY_TIMEOUT_S,
        help=f"how long to wait for the cluster and gateway (default {READY_TIMEOUT_S:.0f})",
    )
    apply.add_argument("--no-wait", action="store_true", help="apply, then return at once")
    apply.set_defaults(func=run_apply)

    status = commands.add_parser("status", help="pods, groups, replicas and readiness")
    _config_options(status)
    _cluster_options(status)
    status.set_defaults(func=run_status)

    delete = commands.add_parser("delete", help="delete what apply created")
    _config_options(delete)
    _cluster_options(delete)
    delete.add_argument(
        "--delete-volume",
        action="store_true",
        help="delete the shared volume too (the model store and job workspaces: its data)",
    )
    delete.set_defaults(func=run_delete)


def _config_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", default=None, help="serving config (default: $LOOM_CONFIG)")
    command.add_argument(
        "--overlay",
        choices=("cpu", "gpu"),
        default=None,
        help="cpu or gpu worker groups (default: gpu when a model sets num_gpus, else cpu)",
    )
    command.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help=f"the namespace (default {DEFAULT_NAMESPACE})",
    )


def _cluster_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube")
    command.add_argument("--context", default=None, help="the kubeconfig's context")


def _config(args: argparse.Namespace) -> tuple[LoomConfig, str]:
    """The config and its text (the bundled default's, written out, when no file is named)."""
    from deploy.render import config_text

    path = args.config or LoomEnv.from_environ().config_path
    if path is None:
        config = default_config()
        return config, config_text(config)
    return load_config(Path(path)), Path(path).read_text(encoding="utf-8")


def _overlay(args: argparse.Namespace, config: LoomConfig) -> Overlay:
    from deploy.render import default_overlay

    chosen: Overlay = args.overlay or default_overlay(config)  # argparse: cpu or gpu
    return chosen


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _objects(args: argparse.Namespace) -> tuple[LoomConfig, list[dict[str, Any]]]:
    from deploy.render import render

    config, _ = _config(args)
    return config, render(config, overlay=_overlay(args, config), namespace=args.namespace)


def run_render(args: argparse.Namespace) -> int:
    from deploy.kustomize import write_tree
    from deploy.render import OVERLAYS, RenderError, check, to_yaml

    try:
        config, source = _config(args)
        if args.out is not None:
            overlays, refused = [], []
            for overlay in OVERLAYS:  # the tree holds each overlay the config can run
                try:
                    check(config, overlay)
                    overlays.append(overlay)
                except RenderError as exc:
                    refused.append(f"no {overlay} overlay: {exc}")
            if not overlays:
                return _fail("; ".join(refused))
            for line in refused:
                _progress(line)
            written = write_tree(
                config, args.out, namespace=args.namespace, source=source, overlays=overlays
            )
            for path in written:
                print(path)
            return 0
        _, objects = _objects(args)
    except (ConfigError, RenderError) as exc:
        return _fail(str(exc))
    sys.stdout.write(to_yaml(objects))
    return 0


def _cluster_name(config: LoomConfig) -> str:
    from deploy.render import with_cluster

    cluster = with_cluster(config).cluster
    assert cluster is not None
    return cluster.name


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_apply(args: argparse.Namespace) -> int:
    from deploy.apply import DeployError, apply, load_api_client, wait_ready
    from deploy.render import RenderError

    try:
        config, objects = _objects(args)
        name = _cluster_name(config)
        with load_api_client(args.kubeconfig, args.context) as api:
            apply(objects, api=api, progress=_progress)
            if args.no_wait:
                return 0
            wait_ready(
                api=api,
                namespace=args.namespace,
                cluster=name,
                timeout_s=args.timeout_s,
                progress=_progress,
            )
        _progress(f"ready: the gateway Service {name}-gateway has ready pods")
    except (ConfigError, RenderError, DeployError) as exc:
        return _fail(str(exc))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from deploy.apply import DeployError, cluster_status, format_status, load_api_client

    try:
        config, _ = _config(args)
        name = _cluster_name(config)
        with load_api_client(args.kubeconfig, args.context) as api:
            status = cluster_status(api=api, namespace=args.namespace, cluster=name)
    except (ConfigError, DeployError) as exc:
        return _fail(str(exc))
    print(format_status(status))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from deploy.apply import DeployError, delete, load_api_client
    from deploy.render import RenderError

    try:
        _, objects = _objects(args)
        with load_api_client(args.kubeconfig, args.context) as api:
            delete(objects, api=api, progress=_progress, keep_volume=not args.delete_volume)
    except (ConfigError, RenderError, DeployError) as exc:
        return _fail(str(exc))
    return 0
