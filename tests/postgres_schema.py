"""A Postgres schema of its own for one test or module, on the service this machine (and CI)
runs at 127.0.0.1:5432; the caller's test skips, saying why, when none is reachable.

Importable from every tier (``tests/`` is on ``sys.path`` through its conftest):

    with fresh_schema() as schema:
        engine = create_db_engine(POSTGRES_URL, schema=schema)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from training.db import create_db_engine

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def fresh_schema(prefix: str = "loom_test") -> Iterator[str]:
    """Create a uniquely named schema, yield its name, drop it (with everything in it)."""
    admin = create_db_engine(POSTGRES_URL)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.orig}")
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
