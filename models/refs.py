"""References to stored models: ``NAME``, ``NAME@VERSION`` or ``NAME#ALIAS``.

Every name, version and alias matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``: it cannot be
empty, cannot start with a dot and holds no slash, so a reference can never walk out of the
store's folder (``..``, ``a/b`` and ``/etc`` are all refused here, before any path is built).
Nor may it be one of the names the store gives its own files (``STORE_OWN_NAMES``: a version
called ``aliases.json`` would be a folder where the aliases file goes).

    ref = ModelRef.parse("minilm#serving")
    ref.name, ref.alias        # ("minilm", "serving")
    str(ref)                   # "minilm#serving"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.errors import InvalidModelRef
from models.manifest import MANIFEST_FILENAME

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PART_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"

ALIASES_FILENAME = "aliases.json"
"""``root/NAME/aliases.json``: the model's aliases, beside its version folders."""
LOCK_FILENAME = ".lock"
"""``root/NAME/.lock``: flock'd around every read-modify-write of the model."""
STAGING_DIRNAME = ".staging"
"""``root/.staging/``: versions being copied in, renamed into place when complete."""
STORE_OWN_NAMES: frozenset[str] = frozenset(
    {ALIASES_FILENAME, MANIFEST_FILENAME, LOCK_FILENAME, STAGING_DIRNAME}
)
"""Every name the store writes beside or inside model folders. No name, version or alias may
be one of them, in any case (a case-insensitive file system collides on ``Aliases.json``
too). The dot-names fail the pattern anyway; they are listed so a rename cannot open a gap."""


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` unchanged if it is a well-formed name, version or alias.

    ``kind`` ("name", "version", "alias") only words the error. Raises ``InvalidModelRef``
    for anything else, including values that are not strings, and for a name the store
    uses for its own files (``STORE_OWN_NAMES``).
    """
    if not isinstance(value, str) or _PART.fullmatch(value) is None:
        raise InvalidModelRef(f"invalid model {kind} {value!r}: expected {_PART_RULE}")
    if value.lower() in STORE_OWN_NAMES:
        raise InvalidModelRef(
            f"invalid model {kind} {value!r}: the model store keeps its own files under "
            f"that name ({', '.join(sorted(STORE_OWN_NAMES))}); choose another"
        )
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
