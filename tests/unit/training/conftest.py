"""Fixtures for the training tests: a job store on SQLite and on PostgreSQL.

Why the store tests sit in the unit tier: they start no Ray. SQLite is a file under
``tmp_path``; PostgreSQL is the service on this machine's loopback (and CI's), the same
127.0.0.1:5432 with trust auth, reached in milliseconds. Each test gets its own Postgres
schema, dropped afterwards; without a reachable server the Postgres cases skip and say why.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from training.db import create_db_engine, create_tables

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgres"])
def db_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a fresh, empty store: a SQLite file, or a Postgres schema of its own."""
    if request.param == "sqlite":
        engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}")
        create_tables(engine)
        yield engine
        engine.dispose()
        return

    admin = create_db_engine(POSTGRES_URL)
    schema = f"loom_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.orig}")
    engine = create_db_engine(POSTGRES_URL, schema=schema)
    try:
        create_tables(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
