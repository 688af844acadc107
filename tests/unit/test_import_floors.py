"""The house's import rules hold (docs/architecture.md): no import cycle anywhere, and every
package imports only from the floors below it. Imports are read from the source, so a
type-only (``if TYPE_CHECKING:``) or a function-local import counts as much as a top-level
one: either still ties the two modules together."""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "training", "serving", "loom", "benchmarks", "deploy")

# Ground first; a floor may import from the floors listed before it and from itself. deploy
# renders the serving config; loom mounts every package's cli.py, deploy's and benchmarks'
# (`loom bench`) too, so no package but loom imports benchmarks.
FLOORS = ("models", "training", "serving", "deploy", "benchmarks", "loom")
# Inside serving: what crosses the hop, the metrics, the monitoring sidecar (what replicas
# report and how it is exported) and the config are the ground; the routing parts and the
# autoscaling policy use only those; the replicas use routing (the hedge-aware router they are
# deployed with); rollout deploys replicas; the gateway uses all of them; the server starts
# the gateway and the rollout; the CLI starts the server.
SERVING_FLOORS = (
    (
        "serving",
        "serving.messages",
        "serving.metrics",
        "serving.monitoring",
        "serving.config",
        "serving.audit",
        "serving.replica_logging",
    ),
    ("serving.routing", "serving.autoscaling"),
    ("serving.replicas",),
    ("serving.rollout",),
    ("serving.gateway",),
    (
        "serving.server",
        "serving.control_plane",
        "serving.run_record",
        "serving.gcs_fault_tolerance",
    ),
    ("serving.cli", "serving.keys_cli", "serving.top", "serving.top_view"),
)


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = module_files()


def owning_module(name: str) -> str | None:
    """The repository module an import of ``name`` loads (``a.b.c`` may name a function in
    module ``a.b``); None for a third-party or standard-library name."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(module: str, path: Path) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {owning_module(name) for name in imported_names(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


GRAPH = import_graph()


def package_floor(module: str) -> int | None:
    top = module.partition(".")[0]
    return FLOORS.index(top) if top in FLOORS else None


def serving_floor(module: str) -> int | None:
    """``serving`` itself is the package's ``__init__``, not everything under it."""
    for level, members in enumerate(SERVING_FLOORS):
        if any(module == m or m != "serving" and module.startswith(m + ".") for m in members):
            return level
    return None


def test_no_module_takes_part_in_an_import_cycle() -> None:
    try:
        graphlib.TopologicalSorter(GRAPH).prepare()
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_each_package_imports_only_from_the_floors_below_it() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if (mine := package_floor(module)) is not None
        and (theirs := package_floor(target)) is not None
        and theirs > mine
    ]
    assert upward == []


def test_inside_serving_each_sub_package_imports_only_from_the_floors_below_it() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.startswith("serving")
        for target in targets
        if (mine := serving_floor(module)) is not None
        and (theirs := serving_floor(target)) is not None
        and theirs > mine
    ]
    assert upward == []


def test_every_serving_module_has_a_floor() -> None:
    """A new sub-package gets a place in SERVING_FLOORS (and in docs/architecture.md)."""
    homeless = [m for m in MODULES if m.startswith("serving") and serving_floor(m) is None]
    assert homeless == []


def test_the_reader_sees_imports_that_only_type_checking_or_a_function_makes(
    tmp_path: Path,
) -> None:
    """The rules are only as good as the reader: a type-only, a function-local and a
    relative import of a repository module are all edges."""
    path = tmp_path / "gateway.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from serving.config import LoomConfig\n"
        "def f():\n    from models import store\n"
        "from .routes import jobs\n"
    )
    names = {owning_module(n) for n in imported_names("serving.gateway.core", path)}
    assert {"serving.config", "models.store", "serving.gateway.routes.jobs"} <= names


def test_a_cycle_is_reported_with_its_modules() -> None:
    with pytest.raises(graphlib.CycleError) as cycle:
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()
    assert set(cycle.value.args[1]) == {"a", "b"}
