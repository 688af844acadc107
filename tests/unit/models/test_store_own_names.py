"""The store's own files: names that would collide with them are refused, a store that already
holds such a folder gives a store error (never an OSError), and what a killed registration
left in ``.staging`` is removed when a store is opened, unless a registration holds it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import models.store as store_module
from models.errors import InvalidModelRef, StoreError
from models.manifest import FileEntry
from models.refs import STORE_OWN_NAMES, ModelRef
from models.store import ModelStore

MakeModelDir = Callable[..., Path]


@pytest.mark.parametrize("own", ["aliases.json", "manifest.json", "Aliases.JSON", "MANIFEST.json"])
def test_a_version_named_like_a_store_file_is_refused_at_register(
    store: ModelStore, make_model_dir: MakeModelDir, own: str
) -> None:
    with pytest.raises(InvalidModelRef, match="the model store keeps its own files under"):
        store.register("enc", make_model_dir(), task="embed", version=own)

    assert not (store.root / "enc" / own).exists()
    assert not store.has("enc")  # nothing half-registered either


@pytest.mark.parametrize("own", ["aliases.json", "manifest.json"])
def test_a_model_name_or_an_alias_named_like_a_store_file_is_refused(
    store: ModelStore, make_model_dir: MakeModelDir, own: str
) -> None:
    with pytest.raises(InvalidModelRef):
        store.register(own, make_model_dir(), task="embed")
    store.register("enc", make_model_dir(), task="embed")
    with pytest.raises(InvalidModelRef):
        store.set_alias("enc", own, "1")
    with pytest.raises(InvalidModelRef):
        ModelRef.parse(f"enc@{own}")
    assert isinstance(InvalidModelRef("x"), StoreError)  # callers catching StoreError see it


def test_every_name_the_store_writes_is_an_own_name() -> None:
    # the four names of the layout in models/store.py's docstring
    assert {"aliases.json", "manifest.json", ".lock", ".staging"} == STORE_OWN_NAMES


def _old_store_with_a_version_folder_named_aliases_json(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    """What a store written before the rule may hold: ``enc/aliases.json/`` as a version."""
    store.register("enc", make_model_dir(), task="embed")
    store.register("ok", make_model_dir(), task="embed")
    folder = store.root / "enc" / "aliases.json"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")


def test_a_store_holding_an_aliases_json_folder_answers_a_store_error_naming_it(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    _old_store_with_a_version_folder_named_aliases_json(store, make_model_dir)

    with pytest.raises(StoreError, match=r"enc/aliases\.json is a folder"):
        store.resolve("enc")
    with pytest.raises(StoreError, match=r"aliases\.json is a folder"):
        store.set_alias("enc", "serving", "1")

    assert store.resolve("ok").version == "1"  # the other model is untouched
    assert [m.version for m in store.show("ok").versions] == ["1"]


def test_listing_leaves_out_a_model_it_cannot_read_and_says_which(
    store: ModelStore, make_model_dir: MakeModelDir, caplog: pytest.LogCaptureFixture
) -> None:
    _old_store_with_a_version_folder_named_aliases_json(store, make_model_dir)

    with caplog.at_level(logging.WARNING, logger="models.store"):
        names = [info.name for info in store.list_models()]

    assert names == ["ok"]
    assert "model enc left out of the list" in caplog.text


def test_a_lock_file_that_is_a_folder_is_a_store_error(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")
    (store.root / "enc" / ".lock").unlink()
    (store.root / "enc" / ".lock").mkdir()

    with pytest.raises(StoreError, match="cannot lock model enc"):
        store.set_alias("enc", "serving", "1")


def test_a_staging_path_that_is_a_file_is_a_store_error_at_register(
    tmp_path: Path, make_model_dir: MakeModelDir
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / ".staging").write_text("not a folder")

    store = ModelStore(root)  # opening does not fail on it

    with pytest.raises(StoreError, match=r"\.staging is not a folder"):
        store.register("enc", make_model_dir(), task="embed")


def test_opening_a_store_removes_what_a_killed_registration_left_in_staging(
    tmp_path: Path, make_model_dir: MakeModelDir
) -> None:
    root = tmp_path / "store"
    ModelStore(root).register("enc", make_model_dir(), task="embed")
    leftover = root / ".staging" / "enc-killed"  # a copy stopped half-way by a SIGKILL
    (leftover / "1_Pooling").mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    (root / ".staging" / "stray-file").write_text("x")

    store = ModelStore(root)

    assert list((root / ".staging").iterdir()) == []
    assert store.resolve("enc").version == "1"  # registered versions are untouched
    assert store.remove_stale_staging() == []  # nothing left the second time


def test_opening_a_store_leaves_a_registration_in_progress_alone(
    tmp_path: Path, make_model_dir: MakeModelDir
) -> None:
    root = tmp_path / "store"
    in_progress = root / ".staging" / "enc-copying"
    in_progress.mkdir(parents=True)
    (in_progress / "model.safetensors").write_bytes(b"partial")
    fd = os.open(in_progress, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what register holds while it copies
    try:
        store = ModelStore(root)
        assert in_progress.is_dir()
        assert (in_progress / "model.safetensors").read_bytes() == b"partial"
        # and a registration of its own beside it works, and leaves only the other one
        store.register("enc", make_model_dir(), task="embed")
        assert [p.name for p in (root / ".staging").iterdir()] == ["enc-copying"]
    finally:
        os.close(fd)
    assert ModelStore(root).remove_stale_staging() == []  # already gone: the open took it
    assert not in_progress.exists()


def test_a_registration_holds_its_staging_folder_against_other_opens(
    tmp_path: Path, make_model_dir: MakeModelDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open in the middle of a copy (another process starting) removes nothing of it."""
    root = tmp_path / "store"
    store = ModelStore(root)
    seen: list[list[str]] = []
    real_copy = store_module._copy_and_hash

    def copy_then_open_another_store(source: Path, target: Path, rel: str) -> FileEntry:
        entry = real_copy(source, target, rel)
        seen.append(ModelStore(root).remove_stale_staging())
        return entry

    monkeypatch.setattr(store_module, "_copy_and_hash", copy_then_open_another_store)

    manifest = store.register("enc", make_model_dir(), task="embed")

    assert seen == [[], [], []]  # one open per file copied (3 files), none removing anything
    assert json.loads((root / "enc" / "1" / "manifest.json").read_text())["version"] == "1"
    assert manifest.version == "1"
    assert list((root / ".staging").iterdir()) == []
