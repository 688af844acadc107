"""Model references and manifests: parsing, printing, and the manifest's JSON form."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from models.errors import InvalidModelRef, StoreError
from models.manifest import FileEntry, Manifest, sha256_file
from models.refs import ModelRef, validate_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("minilm", ModelRef(name="minilm")),
        ("minilm@3", ModelRef(name="minilm", version="3")),
        ("minilm#serving", ModelRef(name="minilm", alias="serving")),
        ("My_Model.v2-x@2024.01", ModelRef(name="My_Model.v2-x", version="2024.01")),
    ],
)
def test_parse_reads_name_version_and_alias_and_str_gives_the_text_back(
    text: str, expected: ModelRef
) -> None:
    ref = ModelRef.parse(text)

    assert ref == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    ["", "../etc", "a/b", "/etc", "..", ".hidden", "a@", "#x", "a@1#b", "a@b@c", "a b", "x" * 65],
)
def test_parse_refuses_malformed_text_with_the_text_in_the_message(text: str) -> None:
    with pytest.raises(InvalidModelRef, match="invalid model"):
        ModelRef.parse(text)


def test_a_ref_cannot_name_both_a_version_and_an_alias() -> None:
    with pytest.raises(InvalidModelRef, match="not both|give one"):
        ModelRef(name="a", version="1", alias="serving")


def test_validate_name_returns_good_names_and_words_the_kind_of_bad_ones() -> None:
    assert validate_name("alias", "canary-2") == "canary-2"
    assert validate_name("name", "x" * 64) == "x" * 64  # 64 is the longest allowed

    with pytest.raises(InvalidModelRef, match="invalid model alias 'a/b'"):
        validate_name("alias", "a/b")


def test_manifest_json_round_trips_with_the_documented_keys() -> None:
    manifest = Manifest(
        name="enc",
        version="2",
        task="embed",
        created_at="2025-01-01T00:00:00Z",
        source="/tmp/enc",
        files=(FileEntry(path="model.safetensors", sha256="ab" * 32, size_bytes=10),),
    )

    text = manifest.to_json()

    assert Manifest.from_json(text) == manifest
    assert '"size_bytes": 10' in text
    assert sorted(manifest.to_dict()) == [
        "created_at",
        "files",
        "name",
        "source",
        "task",
        "version",
    ]


def test_a_manifest_missing_a_field_is_refused_naming_it() -> None:
    with pytest.raises(StoreError, match="'task'"):
        Manifest.from_json(
            '{"name": "a", "version": "1", "created_at": "x", "source": "y", "files": []}'
        )


def test_sha256_file_streams_files_larger_than_one_chunk(tmp_path: Path) -> None:
    data = bytes(range(256)) * (5 * 4096 + 7)  # 5 MiB + 1792 bytes: six 1 MiB chunks
    path = tmp_path / "blob"
    path.write_bytes(data)

    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
