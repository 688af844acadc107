"""References to stored models: ``NAME``, ``NAME@VERSION`` or ``NAME#ALIAS``.

Every name, version and alias matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``: it cannot be
empty, cannot start with a dot and holds no slash, so a reference can never walk out of the
store's folder (``..``, ``a/b`` and ``/etc`` are all refused here, before any path is built).

    ref = ModelRef.parse("minilm#serving")
    ref.name, ref.alias        # ("minilm", "serving")
    str(ref)                   # "minilm#serving"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.errors import InvalidModelRef

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PART_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` unchanged if it is a well-formed name, version or alias.

    ``kind`` ("name", "version", "alias") only words the error. Raises ``InvalidModelRef``
    for anything else, including values that are not strings.
    """
    if not isinstance(value, str) or _PART.fullmatch(value) is None:
        raise InvalidModelRef(f"invalid model {kind} {value!r}: expected {_PART_RULE}")
    return value


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference to a model: its name and at most one of version or alias.

    With neither, the store picks the ``serving`` alias if set, else the latest version.
    """

    name: str
    version: str | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_name("name", self.name)
        if self.version is not None and self.alias is not None:
            raise InvalidModelRef(
                f"model reference {self.name!r} names both version {self.version!r} "
                f"and alias {self.alias!r}; give one"
            )
        if self.version is not None:
            validate_name("version", self.version)
        if self.alias is not None:
            validate_name("alias", self.alias)

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``NAME``, ``NAME@VERSION`` or ``NAME#ALIAS``; else raise ``InvalidModelRef``."""
        if not isinstance(text, str) or not text:
            raise InvalidModelRef(
                f"invalid model reference {text!r}: expected NAME, NAME@VERSION or NAME#ALIAS"
            )
        if "@" in text and "#" in text:
            raise InvalidModelRef(
                f"invalid model reference {text!r}: give a version (@) or an alias (#), not both"
            )
        if "@" in text:
            name, _, version = text.partition("@")
            return cls(name=name, version=version)
        if "#" in text:
            name, _, alias = text.partition("#")
            return cls(name=name, alias=alias)
        return cls(name=text)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}#{self.alias}"
        return self.name
