"""Loom's environment, read once and in one place.

Every ``LOOM_*`` variable is read here and nowhere else; callers take a ``LoomEnv`` and pass
what they need down explicitly.

    env = LoomEnv.from_environ()
    store = ModelStore(env.models_dir)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class LoomEnv:
    home: Path
    """Root of Loom's state (model store, databases, runtime files).

    ``LOOM_HOME``, default ``./var``."""
    api_keys: tuple[str, ...] = ()
    """API keys from ``LOOM_API_KEYS`` (comma separated); they add to the config file's keys."""
    config_path: Path | None = None
    """Serving config file from ``LOOM_CONFIG``; ``--config`` on the command line wins."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Any other ``LOOM_*`` variable, for parts that come later (e.g. ``LOOM_DB_URL``)."""

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def db_url(self) -> str:
        """The job store's SQLAlchemy URL: ``LOOM_DB_URL``, default a SQLite file
        ``$LOOM_HOME/loom.db`` (Postgres in a cluster, e.g.
        ``postgresql+psycopg://user@host:5432/loom``)."""
        return self.extra.get("LOOM_DB_URL") or f"sqlite:///{self.home / 'loom.db'}"

    @property
    def jobs_dir(self) -> Path:
        """Each training job's working files (shards, checkpoints, members), one folder per
        job, removed when the job is cancelled; on a shared volume in a cluster."""
        return self.home / "jobs"

    @property
    def dataset_roots(self) -> tuple[Path, ...]:
        """Folders a job's dataset may lie under: ``LOOM_DATASET_ROOTS`` (``:``-separated),
        default ``$LOOM_HOME/datasets``. A path outside them is refused."""
        raw = self.extra.get("LOOM_DATASET_ROOTS")
        if raw:
            return tuple(Path(p).expanduser().resolve() for p in raw.split(":") if p)
        return (self.home / "datasets",)

    @property
    def ca_file(self) -> str | None:
        """``LOOM_CA_FILE``: a CA certificate (PEM) the ``loom`` client commands trust for an
        https server, beside the system's (a self-signed server's own certificate)."""
        return self.extra.get("LOOM_CA_FILE") or None

    @property
    def keys_file(self) -> Path:
        """The named keys' digests (``loom keys create`` writes them): ``LOOM_KEYS_FILE``,
        default ``$LOOM_HOME/keys.json`` (on Kubernetes a Secret's file, read-only)."""
        named = self.extra.get("LOOM_KEYS_FILE")
        return Path(named).expanduser() if named else self.home / "keys.json"

    @property
    def run_dir(self) -> Path:
        """Runtime files of a running server (metrics shards, pid files)."""
        return self.home / "run"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LoomEnv:
        environ = os.environ if environ is None else environ
        home = Path(environ.get("LOOM_HOME") or "./var").expanduser().resolve()
        keys = tuple(k.strip() for k in environ.get("LOOM_API_KEYS", "").split(",") if k.strip())
        config = environ.get("LOOM_CONFIG")
        known = {"LOOM_HOME", "LOOM_API_KEYS", "LOOM_CONFIG"}
        extra = {k: v for k, v in environ.items() if k.startswith("LOOM_") and k not in known}
        return cls(
            home=home,
            api_keys=keys,
            config_path=Path(config).expanduser() if config else None,
            extra=extra,
        )
