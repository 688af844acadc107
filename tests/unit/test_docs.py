"""The documentation holds: the README stays a front door, every link stays inside the
repository and resolves, and every ``loom`` command and every HTTP route of the gateway is
documented. No Ray, no network: the parser and the gateway's app are built, never run."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from loom.cli import build_parser
from models.store import ModelStore
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.gateway.routes.jobs import JobsSettings, build_jobs_service
from serving.rollout.route_table import RouteFollower
from training.api import JobsService
from training.spec import ClusterCapacity

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
API = REPO / "docs" / "api.md"
PAGES = (README, *sorted((REPO / "docs").glob("*.md")))
MAX_README_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^>\s]*)>")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks (a curl command's URL is not a link)."""
    fence = ""
    for line in text.splitlines():
        opened = FENCE.match(line)
        if fence:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = ""
            continue
        if opened:
            fence = opened.group(1)
            continue
        yield line


def links(text: str) -> list[str]:
    """Every link target in a page's prose: inline, reference-style and autolinks."""
    found = []
    for line in prose_lines(text):
        bare = CODE_SPAN.sub("", line)
        found += INLINE_LINK.findall(bare)
        found += AUTOLINK.findall(bare)
        if (definition := REFERENCE_LINK.match(bare)) is not None:
            found.append(definition.group(1))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower-cased, punctuation but ``-`` and ``_``
    dropped, spaces to ``-``: "Ensembles: scatter/gather" -> "ensembles-scattergather"."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def link_problem(page: Path, target: str) -> str | None:
    """Why ``target`` (a link on ``page``) is broken, or None when it resolves in the repo."""
    if SCHEME.match(target) or target.startswith("//"):
        return "points outside the repository"
    path_part, _, anchor = target.partition("#")
    resolved = (page.parent / unquote(path_part)).resolve() if path_part else page
    if not resolved.is_relative_to(REPO):
        return "points outside the repository"
    if not resolved.exists():
        return "names no file"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"names no heading of {resolved.relative_to(REPO)}"
    return None


def test_the_docs_pages_exist() -> None:
    names = {page.name for page in PAGES}
    expected = {"api.md", "configuration.md", "rollout.md", "training.md", "benchmarks.md"}
    assert expected | {"architecture.md", "README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_link_resolves_to_a_file_and_heading_inside_the_repository(page: Path) -> None:
    problems = [
        f"{target}: {problem}"
        for target in links(page.read_text(encoding="utf-8"))
        if (problem := link_problem(page, target)) is not None
    ]
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_no_relative_path_in_code_points_outside_the_repository(page: Path) -> None:
    # "see `../shared/ARCHITECTURE.md`" is a link in all but name
    outside = [
        span
        for line in prose_lines(page.read_text(encoding="utf-8"))
        for _, span in CODE_SPAN.findall(line)
        if span.startswith("../") and not (page.parent / span).resolve().is_relative_to(REPO)
    ]
    assert outside == []


def test_the_link_checker_finds_what_it_should() -> None:
    text = "[a](docs/api.md) `[b](nope.md)` <https://x.org>\n```\n[c](inside-a-fence.md)\n```\n"
    assert links(text) == ["docs/api.md", "https://x.org"]
    assert link_problem(README, "../outside.md") == "points outside the repository"
    assert link_problem(README, "https://example.com") == "points outside the repository"
    assert link_problem(README, "docs/no-such-page.md") == "names no file"
    assert link_problem(README, "docs/api.md#no-such-heading") is not None
    assert link_problem(README, "docs/api.md#routes") is None
    assert slug("Ensembles: scatter/gather") == "ensembles-scattergather"
    assert slug("The `loom` command") == "the-loom-command"


def test_the_readme_is_a_front_door_of_at_most_250_lines() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    assert "make run" in text
    assert "make test" in text


# ---- the command line ---------------------------------------------------------------------


def leaf_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("loom",)
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(``"loom models register"``, its parser) for every command that runs something."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield " ".join(path), parser
        return
    for action in subcommands:
        for name, child in action.choices.items():
            yield from leaf_commands(child, (*path, name))


def section(text: str, title: str) -> str:
    """The part of a markdown page (code blocks included) from the first heading that
    contains ``title`` to the next heading of the same or a higher level; "" if none."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        match = HEADING.match(line)
        if match is None or title.lower() not in match.group(2).lower():
            continue
        level = len(match.group(1))
        end = start + 1
        while end < len(lines):
            heading = HEADING.match(lines[end])
            if heading is not None and len(heading.group(1)) <= level:
                break
            end += 1
        return "\n".join(lines[start:end])
    return ""


def cli_docs() -> str:
    """Where a command counts as documented: docs/api.md and the README's CLI section."""
    readme_cli = section(README.read_text(encoding="utf-8"), "CLI")
    return API.read_text(encoding="utf-8") + "\n" + readme_cli


def test_every_loom_command_and_option_is_documented() -> None:
    docs = cli_docs()
    commands = dict(leaf_commands(build_parser()))
    assert {"loom serve", "loom models register", "loom train submit"} <= set(commands)
    missing = [name for name in commands if name not in docs]
    undocumented_options = [
        f"{name} {option}"
        for name, parser in commands.items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and option not in docs
    ]
    assert missing == []
    assert undocumented_options == []


# ---- the HTTP routes ----------------------------------------------------------------------


async def _never(*args: object) -> None:
    return None


def http_routes(routes: Iterable[object], prefix: str = "") -> set[tuple[str, str]]:
    """(method, path template) of every route, into included routers and mounts."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:  # FastAPI keeps an included router whole, with its prefix
            context_prefix = getattr(getattr(route, "include_context", None), "prefix", "")
            found |= http_routes(included.routes, prefix + context_prefix)
            continue
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None)
        if path is not None and methods:
            found |= {(method, prefix + path) for method in methods - {"HEAD", "OPTIONS"}}
        elif path is not None and (mounted := getattr(route, "routes", None)):  # a Mount
            found |= http_routes(mounted, prefix + path)
    return found


def gateway_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """Every route of the gateway's app over a config with one model and no ensemble (an
    ensemble adds literal ``/v2/models/<name>/...`` copies of the generic routes), with the
    jobs routes mounted."""
    config = parse_config({"models": [{"name": "enc", "source": "enc"}]})
    built = build_jobs_service(
        JobsSettings(db_url=f"sqlite:///{tmp_path / 'loom.db'}"), max_body_bytes=1 << 20
    )
    jobs = JobsService(
        store=built.store,
        capacity=lambda: ClusterCapacity(total_cpus=1, total_gpus=0),  # Ray's needs a cluster
        dataset_roots=built.dataset_roots,
    )
    core = GatewayCore(config, RouteFollower(_never), ModelStore(tmp_path / "models"), jobs)
    routes = http_routes(build_http_app(core).routes)
    ensembles = tuple(getattr(core, "ensembles", {}))
    return {(method, _generic(path, ensembles)) for method, path in routes}


def _generic(path: str, ensembles: tuple[str, ...]) -> str:
    for name in ensembles:
        path = path.replace(f"/v2/models/{name}/", "/v2/models/{name}/")
        if path == f"/v2/models/{name}":
            path = "/v2/models/{name}"
    return path


def test_every_gateway_route_is_in_the_api_reference(tmp_path: Path) -> None:
    routes = gateway_routes(tmp_path)
    # the walk found the app's own routes and the jobs router's, not an empty set
    assert {("POST", "/v1/embeddings"), ("GET", "/v1/jobs"), ("GET", "/metrics")} <= routes
    api = API.read_text(encoding="utf-8")
    missing = sorted(f"{method} {path}" for method, path in routes if f"{method} {path}" not in api)
    assert missing == []
