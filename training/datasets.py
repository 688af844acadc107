"""A job's dataset folder: the files it holds, each resolved on its own and kept inside it.

A dataset is an absolute folder under one of the allowed roots (``training.spec``'s
``dataset_errors`` checks the folder at submit). Checking the folder alone is not enough: a
symlink inside it (``corpus/passwd.txt -> /etc/passwd``) would be followed out when the files
are read. So every file is resolved (``os.path.realpath``: links and ``..`` followed) and must
stay inside the folder's own resolved path, at submit (a 422 naming ``dataset``) and again
when the corpus is read (a link added after submit is refused too). The walk does not descend
into linked folders.

    files = dataset_files(Path("/data/corpus"), suffixes=TEXT_SUFFIXES)
    escaped = first_escaping_file(files, Path("/data/corpus"))   # (file, where it leads) | None
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl")
"""The files a text corpus folder gives (the ``lm`` trainer's dataset)."""


def dataset_files(folder: Path, *, suffixes: Iterable[str]) -> list[Path]:
    """Every file (or link to one) under ``folder`` with one of ``suffixes``, sorted by path
    relative to ``folder``; linked folders are not walked into."""
    wanted = tuple(suffixes)
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(folder, followlinks=False):
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(wanted))
    return sorted(found, key=lambda path: path.relative_to(folder))


def first_escaping_file(files: Iterable[Path], folder: Path) -> tuple[Path, Path] | None:
    """The first of ``files`` whose resolved path leaves ``folder`` (itself resolved), with
    where it leads; None when every one stays inside."""
    inside = Path(os.path.realpath(folder))
    for path in files:
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(inside):
            return path, resolved
    return None
