"""Fixtures for the training tests: a job store on SQLite and on PostgreSQL.

Why the store tests sit in the unit tier: they start no Ray. SQLite is a file under
``tmp_path``; PostgreSQL is the service on this machine's loopback (and CI's), the same
127.0.0.1:5432 with trust auth, reached in milliseconds. Each test gets its own Postgres
schema, dropped afterwards; without a reachable server the Postgres cases skip and say why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_schema import POSTGRES_URL, fresh_schema
from sqlalchemy import Engine

from training.db import create_db_engine, create_tables


@pytest.fixture(params=["sqlite", "postgres"])
def db_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a fresh, empty store: a SQLite file, or a Postgres schema of its own."""
    if request.param == "sqlite":
        engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}")
        create_tables(engine)
        yield engine
        engine.dispose()
        return

    with fresh_schema() as schema:
        engine = create_db_engine(POSTGRES_URL, schema=schema)
        try:
            create_tables(engine)
            yield engine
        finally:
            engine.dispose()
