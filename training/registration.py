"""Turning a job's result into a model version, once, and moving the ``serving`` alias.

    version = register_once(models, "digits-nightly", export_dir, task="classify",
                            source="loom-job:job-1f2e/mlp")
    previous = promote(models, "digits-nightly", version)

Registration copies files into the store (the filesystem, not the job database), so it cannot
commit in one transaction with the job's state. It is made idempotent instead: each version
records where it came from (``source``, the job and member), and a stage that runs again after
a crash finds the version it made the first time rather than making a second one.
"""

from __future__ import annotations

from pathlib import Path

from models.errors import ModelNotFound
from models.store import SERVING_ALIAS, ModelStore


def job_source(job_id: str, member: str | None = None) -> str:
    """The provenance a job's version records: ``loom-job:<job>`` or ``loom-job:<job>/<member>``."""
    return f"loom-job:{job_id}" + (f"/{member}" if member else "")


def find_version(models: ModelStore, name: str, source: str) -> str | None:
    """The version of ``name`` registered from ``source``, if any."""
    try:
        info = models.show(name)
    except ModelNotFound:
        return None
    for manifest in info.versions:
        if manifest.source == source:
            return manifest.version
    return None


def register_once(models: ModelStore, name: str, folder: Path, *, task: str, source: str) -> str:
    """Register ``folder`` as a new version of ``name`` unless ``source`` already made one."""
    existing = find_version(models, name, source)
    if existing is not None:
        return existing
    return models.register(name, folder, task=task, source=source).version


def promote(models: ModelStore, name: str, version: str, alias: str = SERVING_ALIAS) -> str | None:
    """Point ``alias`` of ``name`` at ``version``; the version it pointed at before, if any.

    Serving's rollout reconciler sees the alias move and rolls the new version out."""
    return models.set_alias(name, alias, version)
