"""The model store: registering, listing, resolving, verifying, and aliases under contention."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from models.errors import (
    HashMismatch,
    InvalidModelRef,
    ModelExists,
    ModelNotFound,
    StoreError,
    UnsafeWeights,
    WrongTask,
)
from models.manifest import sha256_file
from models.refs import ModelRef
from models.store import ModelStore

MakeModelDir = Callable[..., Path]


def test_register_copies_every_file_with_its_sha256_into_a_numbered_version(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    source = make_model_dir()

    manifest = store.register("enc", source, task="embed")

    assert (manifest.name, manifest.version, manifest.task) == ("enc", "1", "embed")
    assert manifest.source == str(source.resolve())
    assert manifest.created_at.endswith("Z")
    paths = [entry.path for entry in manifest.files]
    assert paths == ["1_Pooling/config.json", "config.json", "model.safetensors"]
    stored = store.root / "enc" / "1"
    for entry in manifest.files:
        assert entry.sha256 == sha256_file(source / entry.path) == sha256_file(stored / entry.path)
        assert entry.size_bytes == (source / entry.path).stat().st_size
    assert (stored / "manifest.json").is_file()


def test_versions_count_up_from_one_and_sort_numerically(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    source = make_model_dir()
    assert store.register("enc", source, task="embed").version == "1"
    assert store.register("enc", source, task="embed").version == "2"
    assert store.register("enc", source, task="embed", version="10").version == "10"
    # highest number 10, plus 1
    assert store.register("enc", source, task="embed").version == "11"

    versions = [m.version for m in store.show("enc").versions]

    assert versions == ["1", "2", "10", "11"]  # numeric, not "1" < "10" < "11" < "2"


def test_registering_an_existing_version_raises_model_exists(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed", version="3")

    with pytest.raises(ModelExists, match="enc already has version 3"):
        store.register("enc", make_model_dir(seed=1), task="embed", version="3")


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "sub/extra.pt", "opt.ckpt", "x.pkl"])
def test_pickle_weights_are_refused_naming_the_file(
    store: ModelStore, make_model_dir: MakeModelDir, weights: str
) -> None:
    source = make_model_dir(extra={weights: b"\x80\x04pickle"})

    with pytest.raises(UnsafeWeights, match=weights.replace(".", r"\.")):
        store.register("enc", source, task="embed")

    assert not store.has("enc")


def test_a_folder_without_safetensors_is_refused(store: ModelStore, tmp_path: Path) -> None:
    source = tmp_path / "configs-only"
    source.mkdir()
    (source / "config.json").write_text("{}")

    with pytest.raises(UnsafeWeights, match=r"no \*\.safetensors"):
        store.register("enc", source, task="embed")


def test_a_symlink_leading_out_of_the_folder_is_refused(
    store: ModelStore, make_model_dir: MakeModelDir, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any model")
    source = make_model_dir()
    (source / "tokenizer.json").symlink_to(secret)

    with pytest.raises(StoreError, match=r"symlink 'tokenizer\.json'.*outside"):
        store.register("enc", source, task="embed")


def test_a_symlink_inside_the_folder_is_copied_as_a_file(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    source = make_model_dir()
    (source / "alias.json").symlink_to(source / "config.json")

    manifest = store.register("enc", source, task="embed")

    copied = store.root / "enc" / "1" / "alias.json"
    assert not copied.is_symlink()
    assert manifest.file("alias.json").sha256 == sha256_file(source / "config.json")


def test_dot_files_are_left_behind(store: ModelStore, make_model_dir: MakeModelDir) -> None:
    source = make_model_dir(extra={".gitattributes": b"*.bin lfs", ".cache/x.lock": b""})

    manifest = store.register("enc", source, task="embed")

    assert [e.path for e in manifest.files if e.path.startswith(".")] == []


def test_an_unknown_task_or_a_changed_task_is_refused(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    with pytest.raises(StoreError, match="unknown task 'translate'"):
        store.register("enc", make_model_dir(), task="translate")
    store.register("enc", make_model_dir(), task="embed")

    with pytest.raises(StoreError, match="enc is a embed model"):
        store.register("enc", make_model_dir(), task="classify")


def test_a_failed_registration_leaves_no_version_and_no_staging_files(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed", version="1")

    with pytest.raises(ModelExists):
        store.register("enc", make_model_dir(), task="embed", version="1")

    assert sorted(p.name for p in (store.root / "enc").iterdir()) == [".lock", "1"]
    assert list((store.root / ".staging").iterdir()) == []


def test_list_and_show_report_tasks_versions_and_aliases(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("b-enc", make_model_dir(), task="embed")
    store.register("a-cls", make_model_dir(), task="classify")
    store.register("a-cls", make_model_dir(seed=1), task="classify")
    store.set_alias("a-cls", "serving", "1")

    infos = store.list_models()

    assert [(i.name, i.task, len(i.versions)) for i in infos] == [
        ("a-cls", "classify", 2),
        ("b-enc", "embed", 1),
    ]
    assert store.show("a-cls").aliases == {"serving": "1"}
    with pytest.raises(ModelNotFound, match="no model named 'nope'"):
        store.show("nope")


def test_an_empty_store_lists_nothing(store: ModelStore) -> None:
    assert store.list_models() == []
    assert not store.has("enc")


def test_resolve_picks_the_serving_alias_then_the_latest_version(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    for seed in range(3):
        store.register("enc", make_model_dir(seed=seed), task="embed")

    assert store.resolve("enc").version == "3"  # no serving alias: the latest
    store.set_alias("enc", "serving", "2")
    assert store.resolve("enc").version == "2"
    assert store.resolve("enc@1").version == "1"
    assert store.resolve(ModelRef(name="enc", version="3")).version == "3"
    store.set_alias("enc", "canary", "3")
    resolved = store.resolve("enc#canary")

    assert (resolved.name, resolved.version, resolved.task) == ("enc", "3", "embed")
    assert resolved.path == store.root / "enc" / "3"
    assert resolved.manifest.version == "3"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", "no model named 'nope'"),
        ("enc@7", "enc has no version '7'"),
        ("enc#canary", "enc has no alias 'canary'"),
    ],
)
def test_resolving_something_missing_names_what_is_missing(
    store: ModelStore, make_model_dir: MakeModelDir, ref: str, message: str
) -> None:
    store.register("enc", make_model_dir(), task="embed")

    with pytest.raises(ModelNotFound, match=message):
        store.resolve(ref)


def test_set_alias_returns_the_version_the_alias_pointed_at_before(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    for seed in range(3):
        store.register("enc", make_model_dir(seed=seed), task="embed")

    assert store.set_alias("enc", "serving", "1") is None  # unset before
    assert store.set_alias("enc", "serving", "3") == "1"
    assert store.set_alias("enc", "serving", "3") == "3"  # moved onto itself
    assert store.set_alias("enc", "canary", "2") is None  # another alias: its own history
    assert store.aliases("enc") == {"serving": "3", "canary": "2"}


def test_concurrent_alias_moves_each_see_the_move_before_them(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    for seed in range(2):
        store.register("enc", make_model_dir(seed=seed), task="embed")
    moves: list[tuple[str | None, str]] = []  # (returned previous, written)
    errors: list[BaseException] = []

    def mover(worker: int) -> None:
        try:
            for step in range(20):
                version = str(1 + (worker + step) % 2)
                moves.append((store.set_alias("enc", "serving", version), version))
        except BaseException as exc:  # a thread's error is lost unless kept for the assert
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    # the moves form one chain: each returned the value the one before it wrote, so the
    # returns are None plus every write but the last (120 moves -> 119 writes + None); a
    # read outside the lock lets two moves return the same previous and the counts differ
    final = store.aliases("enc")["serving"]
    returned = sorted((previous or "-" for previous, _ in moves))
    written = [version for _, version in moves]
    written.remove(final)
    assert returned == sorted(["-", *written])


def test_an_alias_can_only_point_at_an_existing_version(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")

    with pytest.raises(ModelNotFound, match="no version '9'"):
        store.set_alias("enc", "serving", "9")
    assert store.aliases("enc") == {}


@pytest.mark.parametrize("ref", ["../etc", "a/b", "", "/etc/passwd", ".hidden", "x" * 65])
def test_malformed_references_are_refused_before_touching_the_disk(
    store: ModelStore, ref: str
) -> None:
    with pytest.raises(InvalidModelRef):
        store.resolve(ref)


def test_a_malformed_name_cannot_be_registered(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    with pytest.raises(InvalidModelRef, match="invalid model name '../evil'"):
        store.register("../evil", make_model_dir(), task="embed")
    with pytest.raises(InvalidModelRef, match="invalid model version 'a/b'"):
        store.register("enc", make_model_dir(), task="embed", version="a/b")


def test_concurrent_alias_writers_leave_valid_json_and_no_temp_files(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")
    store.register("enc", make_model_dir(seed=1), task="embed")
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            for step in range(25):
                store.set_alias("enc", f"w{worker}", str(1 + step % 2))
                store.aliases("enc")  # a reader racing the writers never sees a torn file
        except BaseException as exc:  # a thread's error is lost unless kept for the assert
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    aliases = json.loads((store.root / "enc" / "aliases.json").read_text())
    # 8 writers, each one alias, last step 24: 1 + 24 % 2 = 1; no update was lost
    assert aliases == {f"w{n}": "1" for n in range(8)}
    assert [p.name for p in (store.root / "enc").iterdir() if p.name.startswith(".aliases")] == []


def test_verify_passes_for_an_untouched_version(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")

    store.verify(store.resolve("enc"))  # no exception


def test_open_resolves_and_verifies_a_version_of_the_asked_task(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")
    assert store.open("enc", task="embed").version == "1"
    with pytest.raises(WrongTask, match="enc@1 is a embed model, not generate"):
        store.open("enc", task="generate")
    weights = store.resolve("enc").path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # a truncated file fails the hash check
    with pytest.raises(HashMismatch):
        store.open("enc", task="embed")


def test_verify_names_a_tampered_file_and_both_hashes(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")
    resolved = store.resolve("enc")
    weights = resolved.path / "model.safetensors"
    expected = resolved.manifest.file("model.safetensors").sha256
    with open(weights, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))  # flip one byte
    actual = sha256_file(weights)

    with pytest.raises(HashMismatch) as caught:
        store.verify(resolved)

    message = str(caught.value)
    assert "'model.safetensors'" in message
    assert expected in message
    assert actual in message


def test_verify_refuses_a_missing_file_and_an_unlisted_one(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")
    resolved = store.resolve("enc")
    (resolved.path / "1_Pooling" / "config.json").unlink()

    with pytest.raises(HashMismatch, match=r"'1_Pooling/config\.json' .* is missing"):
        store.verify(resolved)

    (resolved.path / "1_Pooling" / "config.json").write_text("{}")
    (resolved.path / "added.safetensors").write_bytes(b"")
    with pytest.raises(HashMismatch, match=r"'added\.safetensors' .* not in its manifest"):
        store.verify(resolved)


def test_verify_refuses_pickle_weights_dropped_into_a_version(
    store: ModelStore, make_model_dir: MakeModelDir
) -> None:
    store.register("enc", make_model_dir(), task="embed")
    resolved = store.resolve("enc")
    (resolved.path / "pytorch_model.bin").write_bytes(b"\x80\x04")

    with pytest.raises(UnsafeWeights, match=r"pytorch_model\.bin"):
        store.verify(resolved)
