"""Which files of a source folder a registration copies, and where each one really lives.

A model folder is copied whole, subfolders included (``1_Pooling/config.json``), with three
exceptions, each for a reason:

- dot-files and dot-folders (``.git``, ``.gitattributes``, ``.cache``) are version-control or
  download bookkeeping, not the model;
- a top-level ``manifest.json`` is the store's own file and would be overwritten;
- a symlink must lead to somewhere inside the folder: one that leads out (``/etc/passwd``,
  ``../other``) is refused, so registering never copies files the folder's owner did not
  put in it. A symlinked folder inside is followed unless it leads back to one of its own
  ancestors (a loop).

    list_source_files(Path("/tmp/minilm"))
    # [("1_Pooling/config.json", Path(".../1_Pooling/config.json")), ("config.json", ...), ...]
"""

from __future__ import annotations

import os
from pathlib import Path

from models.errors import StoreError
from models.manifest import MANIFEST_FILENAME


def list_source_files(source_dir: Path) -> list[tuple[str, Path]]:
    """(relative path with ``/``, real path to read) for every file to copy, sorted by path.

    Raises ``StoreError`` naming the link for a symlink leading outside ``source_dir``, a
    symlinked folder that loops, or a link that leads nowhere.
    """
    root = Path(source_dir).resolve()
    found: list[tuple[str, Path]] = []
    _walk(root, Path(source_dir), Path(), found, ancestors=(root,))
    if not found:
        raise StoreError(f"model folder {source_dir} holds no files")
    return sorted(found, key=lambda item: item[0])


def _walk(
    root: Path,
    folder: Path,
    rel_folder: Path,
    found: list[tuple[str, Path]],
    ancestors: tuple[Path, ...],
) -> None:
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            rel = rel_folder / entry.name
            if rel.as_posix() == MANIFEST_FILENAME:
                continue
            path = Path(entry.path)
            real = path.resolve()
            if entry.is_symlink():
                _check_link(root, rel, real)
            if real.is_dir():
                if real in ancestors:
                    raise StoreError(f"symlinked folder {rel.as_posix()!r} loops back on itself")
                _walk(root, path, rel, found, ancestors=(*ancestors, real))
            elif real.is_file():
                found.append((rel.as_posix(), real))
            # anything else (a socket, a fifo) is not part of a model: skipped


def _check_link(root: Path, rel: Path, real: Path) -> None:
    if not real.is_relative_to(root):
        raise StoreError(
            f"refusing symlink {rel.as_posix()!r}: it leads to {real}, outside the model folder; "
            f"copy the file in instead"
        )
    if not real.exists():
        raise StoreError(f"symlink {rel.as_posix()!r} leads nowhere ({real} does not exist)")
