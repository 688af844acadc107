"""Parsing of the benchmark command lines' list and KEY=VALUE options; pure, so testable.

parse_int_list("1,8,32,64")                     # (1, 8, 32, 64)
parse_env_assignments(["RAY_SERVE_X=1"])       # {"RAY_SERVE_X": "1"}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import yaml

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, order kept, duplicates dropped: ``"1, 8,8"`` -> (1, 8).

    Raises ``ValueError`` on an empty list, a non-integer or a value below 1.
    """
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"not an integer: {part!r} in {text!r}") from None
        if value < 1:
            raise ValueError(f"values must be >= 1, got {value} in {text!r}")
        if value not in values:
            values.append(value)
    if not values:
        raise ValueError(f"no values in {text!r}")
    return tuple(values)


def parse_env_assignments(assignments: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; the value may be empty or hold ``=``; the last one wins.

    Raises ``ValueError`` for a string without ``=`` or a key that is not a variable name.
    """
    env: dict[str, str] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise ValueError(f"expected KEY=VALUE with KEY a variable name, got {assignment!r}")
        env[key] = value
    return env


MODEL_PREFIX = "model."


def parse_variants(specs: Iterable[str]) -> dict[str, dict[str, str]]:
    """``LABEL:KEY=VALUE[,KEY=VALUE]`` strings as {label: assignments}: ``"ha:A=1,B=2"`` ->
    ``{"ha": {"A": "1", "B": "2"}}``. A key is an environment variable, or ``model.FIELD`` for
    a field of the generated model config (``model.replicas=1``). Raises ``ValueError`` for a
    missing label or a bad pair."""
    variants: dict[str, dict[str, str]] = {}
    for spec in specs:
        label, sep, assignments = spec.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", label):
            raise ValueError(f"expected LABEL:KEY=VALUE[,KEY=VALUE], got {spec!r}")
        pairs = [a for a in assignments.split(",") if a]
        model = [p for p in pairs if p.startswith(MODEL_PREFIX)]
        env = parse_env_assignments(p for p in pairs if not p.startswith(MODEL_PREFIX))
        for pair in model:
            key, eq, value = pair.partition("=")
            if not eq or not _ENV_KEY.fullmatch(key[len(MODEL_PREFIX) :]):
                raise ValueError(f"expected model.FIELD=VALUE, got {pair!r}")
            env[key] = value
        variants[label] = env
    return variants


def split_variant(assignments: Mapping[str, str]) -> tuple[dict[str, str], dict[str, object]]:
    """A variant's environment, and its model-config overrides with YAML-typed values:
    ``{"A": "1", "model.replicas": "2"}`` -> ``({"A": "1"}, {"replicas": 2})``."""
    env = {k: v for k, v in assignments.items() if not k.startswith(MODEL_PREFIX)}
    model = {
        k[len(MODEL_PREFIX) :]: yaml.safe_load(v)
        for k, v in assignments.items()
        if k.startswith(MODEL_PREFIX)
    }
    return env, model
