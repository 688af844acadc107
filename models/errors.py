"""Errors of the model store and engines; each message names the thing at fault."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: something about a stored model is wrong or missing."""


class ModelNotFound(StoreError):
    """No such model, version or alias in the store."""


class InvalidModelRef(StoreError):
    """A name, version, alias or reference that is not well formed."""


class UnsafeWeights(StoreError):
    """A weights file in a format other than safetensors (pickle can run code on load)."""


class HashMismatch(StoreError):
    """A stored file's sha256 differs from its manifest: the file changed after registration."""


class ModelExists(StoreError):
    """Registering a version that already exists."""


class WrongTask(StoreError):
    """A stored version is a model for another task than the one asked for."""
