"""Parsing of the benchmark command lines' list and KEY=VALUE options; pure, so testable.

parse_int_list("1,8,32,64")                     # (1, 8, 32, 64)
parse_env_assignments(["RAY_SERVE_X=1"])       # {"RAY_SERVE_X": "1"}
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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


def parse_variants(specs: Iterable[str]) -> dict[str, dict[str, str]]:
    """``LABEL:KEY=VALUE[,KEY=VALUE]`` strings as {label: env}: ``"ha:A=1,B=2"`` ->
    ``{"ha": {"A": "1", "B": "2"}}``. Raises ``ValueError`` for a missing label or a bad pair."""
    variants: dict[str, dict[str, str]] = {}
    for spec in specs:
        label, sep, assignments = spec.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", label):
            raise ValueError(f"expected LABEL:KEY=VALUE[,KEY=VALUE], got {spec!r}")
        variants[label] = parse_env_assignments(a for a in assignments.split(",") if a)
    return variants
