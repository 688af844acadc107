"""The model store: versioned, hashed, safetensors-only model folders on a local disk.

Layout under ``root`` (names, versions and aliases are checked by ``models.refs``, so no
part of a path ever comes from unchecked text, and none is one of the store's own names)::

    root/NAME/VERSION/...          the registered files, copied, subfolders kept
    root/NAME/VERSION/manifest.json
    root/NAME/aliases.json         {"serving": "2"}; replaced atomically, under a lock
    root/NAME/.lock                flock'd around every read-modify-write of NAME
    root/.staging/                 half-copied versions; renamed into place when complete;
                                   what a killed registration left is removed at open

    store = ModelStore(Path("var/models"))
    store.register("minilm", Path("/tmp/minilm"), task="embed")     # version "1"
    resolved = store.resolve("minilm")          # the serving alias, else the latest
    store.verify(resolved)                      # sha256 of every file against the manifest
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from models.errors import HashMismatch, ModelExists, ModelNotFound, StoreError, WrongTask
from models.manifest import (
    HASH_CHUNK_BYTES,
    MANIFEST_FILENAME,
    FileEntry,
    Manifest,
    sha256_file,
    utc_now_iso,
)
from models.refs import (
    ALIASES_FILENAME,
    LOCK_FILENAME,
    STAGING_DIRNAME,
    ModelRef,
    validate_name,
)
from models.sources import list_source_files
from models.weights import require_safe_weight_paths, require_safe_weights

TASKS: frozenset[str] = frozenset({"embed", "generate", "classify"})
SERVING_ALIAS = "serving"
"""The alias serving follows; a bare ``NAME`` resolves to it when it is set."""

logger = logging.getLogger(__name__)

_STAGING_ATTEMPTS = 10
"""Fresh staging folders tried before giving up (one is lost only when another process's
open removes it in the instant before it is locked)."""


def version_sort_key(version: str) -> tuple[int, int, str]:
    """Numbered versions in numeric order ("2" < "10"), then named ones alphabetically."""
    if version.isdigit():
        return (0, int(version), version)
    return (1, 0, version)


@dataclass(frozen=True)
class ModelInfo:
    """One stored model: its task, its versions (oldest first) and its aliases."""

    name: str
    task: str
    versions: tuple[Manifest, ...]
    aliases: Mapping[str, str]
    """Alias -> version, e.g. ``{"serving": "2"}``."""

    @property
    def latest(self) -> Manifest:
        return self.versions[-1]


@dataclass(frozen=True)
class ResolvedModel:
    """A reference resolved to one stored version; ``path`` is the version's folder."""

    name: str
    version: str
    task: str
    path: Path
    manifest: Manifest

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)


class ModelStore:
    """The store under ``root`` (created on first write). Safe across threads and processes.

    Versions are immutable once registered; only aliases move. Opening a store removes what
    a registration killed mid-copy left in ``root/.staging`` (a registration in progress
    holds a lock on its folder, so it is never taken for a leftover).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.remove_stale_staging()

    # -- writing ---------------------------------------------------------------------------

    def register(
        self,
        name: str,
        source_dir: Path,
        *,
        task: str,
        version: str | None = None,
        source: str | None = None,
    ) -> Manifest:
        """Copy ``source_dir`` into the store as a new version of ``name``; return its manifest.

        ``version`` defaults to the next number (highest numbered version + 1, from "1").
        Raises ``UnsafeWeights`` for a folder with non-safetensors weights or no safetensors
        at all, ``ModelExists`` for a version already stored, ``StoreError`` for a bad task,
        a task that differs from the model's earlier versions, or a symlink leading out of
        ``source_dir``. A failed or interrupted registration leaves no version behind.
        """
        validate_name("name", name)
        if version is not None:
            validate_name("version", version)
        if task not in TASKS:
            raise StoreError(f"unknown task {task!r}: expected one of {', '.join(sorted(TASKS))}")
        source_dir = Path(source_dir)
        if not source_dir.is_dir():
            raise StoreError(f"model folder {source_dir} does not exist or is not a folder")
        files = list_source_files(source_dir)
        # Judged on what will be copied, symlinked subfolders included.
        require_safe_weight_paths((rel for rel, _ in files), where=str(source_dir))

        staging, staging_fd = self._new_staging(name)
        try:
            # Copy and hash outside the lock: this is the slow part (90 MB for MiniLM).
            entries = [_copy_and_hash(real, staging / rel, rel) for rel, real in files]
            with self._locked(name):
                self._check_task_matches(name, task)
                chosen = version if version is not None else self._next_version(name)
                target = self.root / name / chosen
                if target.exists():
                    raise ModelExists(f"model {name} already has version {chosen}")
                manifest = Manifest(
                    name=name,
                    version=chosen,
                    task=task,
                    created_at=utc_now_iso(),
                    source=source if source is not None else str(source_dir.resolve()),
                    files=tuple(sorted(entries, key=lambda e: e.path)),
                )
                (staging / MANIFEST_FILENAME).write_text(manifest.to_json())
                # One rename publishes the whole version: readers see all of it or none.
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(staging_fd)  # releases its lock
        return manifest

    def remove_stale_staging(self) -> list[str]:
        """Remove every entry of ``root/.staging`` that no registration holds: what a process
        killed mid-copy left. Returns the names removed; one that cannot be removed is logged
        and left (a read-only store, say)."""
        staging_root = self.root / STAGING_DIRNAME
        try:
            entries = sorted(staging_root.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            logger.warning("cannot read the model store's staging folder %s: %s", staging_root, exc)
            return []
        removed = []
        for entry in entries:
            try:
                if _remove_unless_locked(entry):
                    removed.append(entry.name)
            except OSError as exc:
                logger.warning("cannot remove %s (an interrupted registration): %s", entry, exc)
        if removed:
            logger.info(
                "removed %d interrupted registration(s) from %s: %s",
                len(removed),
                staging_root,
                ", ".join(removed),
            )
        return removed

    def set_alias(self, name: str, alias: str, version: str) -> str | None:
        """Point ``alias`` of ``name`` at ``version``, which must exist (else ModelNotFound);
        the version it pointed at before, None if it was unset.

        The previous version is read under the same lock as the write, so of two concurrent
        moves each sees the other's result or the state before both, never a lost update:

            store.set_alias("enc", "serving", "2")   # None: the alias was new
            store.set_alias("enc", "serving", "3")   # "2"
        """
        validate_name("alias", alias)
        self._read_manifest(name, version)  # raises ModelNotFound for a missing version
        with self._locked(name):
            current = self._read_aliases(name)
            previous = current.get(alias)
            current[alias] = version
            self._write_aliases(name, current)
        return previous

    def remove_alias(self, name: str, alias: str) -> None:
        """Drop ``alias`` of ``name``; ModelNotFound if it is not set."""
        validate_name("alias", alias)
        self._require_model(name)
        with self._locked(name):
            current = self._read_aliases(name)
            if alias not in current:
                raise ModelNotFound(f"model {name} has no alias {alias!r}")
            del current[alias]
            self._write_aliases(name, current)

    # -- reading ---------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        """True if ``name`` has at least one registered version."""
        validate_name("name", name)
        return bool(self._version_names(name))

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version for ``name``; ModelNotFound if the model does not exist."""
        self._require_model(name)
        return self._read_aliases(name)

    def show(self, name: str) -> ModelInfo:
        """Everything stored about ``name``; ModelNotFound if it has no versions."""
        self._require_model(name)
        manifests = tuple(self._read_manifest(name, v) for v in self._version_names(name))
        return ModelInfo(
            name=name,
            task=manifests[-1].task,
            versions=manifests,
            aliases=self._read_aliases(name),
        )

    def list_models(self) -> list[ModelInfo]:
        """Every stored model with at least one version, sorted by name. A model whose records
        cannot be read (its ``aliases.json`` is a folder, say) is left out with a warning that
        names it, so one broken model does not hide the rest."""
        if not self.root.is_dir():
            return []
        names = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        infos = []
        for name in names:
            if not _is_valid_name(name) or not self._version_names(name):
                continue
            try:
                infos.append(self.show(name))
            except StoreError as exc:
                logger.warning("model %s left out of the list: %s", name, exc)
        return infos

    def resolve(self, ref: str | ModelRef) -> ResolvedModel:
        """Resolve ``NAME`` (the serving alias, else the latest), ``NAME@V`` or ``NAME#ALIAS``.

        Raises ``InvalidModelRef`` for malformed text and ``ModelNotFound`` naming the model,
        version or alias that is missing.
        """
        parsed = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
        name = parsed.name
        self._require_model(name)
        if parsed.version is not None:
            version = parsed.version
        elif parsed.alias is not None:
            aliases = self._read_aliases(name)
            if parsed.alias not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise ModelNotFound(
                    f"model {name} has no alias {parsed.alias!r} (aliases: {known})"
                )
            version = aliases[parsed.alias]
        else:
            version = self._read_aliases(name).get(SERVING_ALIAS) or self._version_names(name)[-1]
        manifest = self._read_manifest(name, version)
        return ResolvedModel(
            name=name,
            version=version,
            task=manifest.task,
            path=self.root / name / version,
            manifest=manifest,
        )

    def open(self, ref: str | ModelRef, *, task: str) -> ResolvedModel:
        """``resolve`` then ``verify``, for a model of ``task``: what a server does before it
        loads a version. Raises ``WrongTask`` for a version of another task, and whatever
        ``resolve`` and ``verify`` raise."""
        resolved = self.resolve(ref)
        if resolved.task != task:
            raise WrongTask(
                f"{resolved.name}@{resolved.version} is a {resolved.task} model, not {task}"
            )
        self.verify(resolved)
        return resolved

    def verify(self, resolved: ResolvedModel) -> None:
        """Check the version's folder against its manifest, file by file.

        Raises ``UnsafeWeights`` if a non-safetensors weights file is present, and
        ``HashMismatch`` naming the file for a missing file, a file the manifest does not
        list, or a sha256 that differs (both hashes in the message).
        """
        folder = resolved.path
        label = f"{resolved.name}@{resolved.version}"
        require_safe_weights(folder)
        listed = {entry.path for entry in resolved.manifest.files}
        present = {
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()
        } - {MANIFEST_FILENAME}
        extra = sorted(present - listed)
        if extra:
            raise HashMismatch(f"file {extra[0]!r} of model {label} is not in its manifest")
        for entry in resolved.manifest.files:
            path = folder / entry.path
            if not path.is_file():
                raise HashMismatch(
                    f"file {entry.path!r} of model {label} is missing "
                    f"(manifest sha256 {entry.sha256})"
                )
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise HashMismatch(
                    f"file {entry.path!r} of model {label} has sha256 {actual}, "
                    f"but its manifest says {entry.sha256}"
                )

    # -- internals -------------------------------------------------------------------------

    def _new_staging(self, name: str) -> tuple[Path, int]:
        """A fresh folder under ``root/.staging`` and an open descriptor holding an exclusive
        flock on it: while it is held, no store's open takes the folder for a leftover."""
        staging_root = self.root / STAGING_DIRNAME
        try:
            staging_root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(
                f"{staging_root} is not a folder; the model store keeps half-copied versions "
                "there: move it away"
            ) from None
        for _ in range(_STAGING_ATTEMPTS):
            staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
            try:
                fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:  # another process's open removed it before we locked it
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                ours = os.stat(staging).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                ours = False  # removed while we waited for the lock
            if ours:
                os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a shared store must be readable
                return staging, fd
            os.close(fd)
        raise StoreError(f"could not make a staging folder under {staging_root}")

    def _require_model(self, name: str) -> None:
        if not self.has(name):
            raise ModelNotFound(f"no model named {name!r} in the store at {self.root}")

    def _version_names(self, name: str) -> list[str]:
        """Registered versions of ``name`` (a folder with a manifest), oldest first."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        versions = [
            p.name
            for p in model_dir.iterdir()
            if _is_valid_name(p.name) and (p / MANIFEST_FILENAME).is_file()
        ]
        return sorted(versions, key=version_sort_key)

    def _next_version(self, name: str) -> str:
        numbered = [int(v) for v in self._version_names(name) if v.isdigit()]
        return str(max(numbered, default=0) + 1)

    def _check_task_matches(self, name: str, task: str) -> None:
        versions = self._version_names(name)
        if versions:
            existing = self._read_manifest(name, versions[-1]).task
            if existing != task:
                raise StoreError(
                    f"model {name} is a {existing} model; a new version cannot be {task}"
                )

    def _read_manifest(self, name: str, version: str) -> Manifest:
        validate_name("name", name)
        validate_name("version", version)
        path = self.root / name / version / MANIFEST_FILENAME
        if not path.is_file():
            known = ", ".join(self._version_names(name)) or "none"
            raise ModelNotFound(f"model {name} has no version {version!r} (versions: {known})")
        try:
            manifest = Manifest.from_json(path.read_text())
        except StoreError as exc:
            raise StoreError(f"{path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"{path} cannot be read: {exc}") from None
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(
                f"{path} describes {manifest.name}@{manifest.version}, not {name}@{version}"
            )
        return manifest

    def _read_aliases(self, name: str) -> dict[str, str]:
        path = self.root / name / ALIASES_FILENAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except IsADirectoryError:
            raise StoreError(
                f"{path} is a folder, not the model's aliases file (a version folder named like "
                "the store's own file?); move it out of the store"
            ) from None
        except OSError as exc:
            raise StoreError(f"{path} cannot be read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise StoreError(f"{path} is not a JSON object of alias -> version")
        return data

    def _write_aliases(self, name: str, aliases: Mapping[str, str]) -> None:
        """Write to a temp file beside ``aliases.json``, fsync, then ``os.replace`` over it."""
        model_dir = self.root / name
        fd, tmp = tempfile.mkstemp(prefix=".aliases-", suffix=".tmp", dir=model_dir)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(dict(sorted(aliases.items())), handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; readers may be other users
            os.replace(tmp, model_dir / ALIASES_FILENAME)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold an exclusive flock on ``root/NAME/.lock`` (per open file: threads exclude too)."""
        model_dir = self.root / name
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            lock_file = open(model_dir / LOCK_FILENAME, "a")  # noqa: SIM115  # closed below
        except OSError as exc:  # a folder named .lock, a file where the model's folder goes
            raise StoreError(f"cannot lock model {name} at {model_dir}: {exc}") from None
        with lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _is_valid_name(value: str) -> bool:
    try:
        validate_name("name", value)
    except StoreError:
        return False
    return True


def _remove_unless_locked(entry: Path) -> bool:
    """Remove ``entry`` (a staging folder) unless a registration holds its lock; True if
    removed. A stray file there is removed too: nothing the store writes lives there."""
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
        return True
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False  # its registration finished (renamed it into place) meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a registration is copying into it now
        try:
            if os.stat(entry).st_ino != os.fstat(fd).st_ino:
                return False
        except FileNotFoundError:
            return False  # renamed into place (a finished version) before we locked it
        shutil.rmtree(entry)
        return True
    finally:
        os.close(fd)


def _copy_and_hash(source: Path, target: Path, rel: str) -> FileEntry:
    """Copy one file's bytes (no metadata), hashing them on the way: one read, one write."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size_bytes = 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            size_bytes += len(chunk)
    return FileEntry(path=rel, sha256=digest.hexdigest(), size_bytes=size_bytes)
