"""The job store's engine: where it lives by default, and how SQLite is set up."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from models.settings import LoomEnv
from training.db import create_db_engine, create_tables, transaction, work_items


def test_db_url_defaults_to_a_sqlite_file_under_loom_home(tmp_path: Path) -> None:
    env = LoomEnv.from_environ({"LOOM_HOME": str(tmp_path)})
    assert env.db_url == f"sqlite:///{tmp_path / 'loom.db'}"


def test_loom_db_url_overrides_the_default(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    env = LoomEnv.from_environ({"LOOM_HOME": str(tmp_path), "LOOM_DB_URL": url})
    assert env.db_url == url


def test_sqlite_engine_uses_wal_a_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}", sqlite_busy_timeout_ms=1234)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() == 1234
            assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    finally:
        engine.dispose()


def test_transaction_rolls_back_when_its_block_raises(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}")
    create_tables(engine)
    row = {
        "queue": "q",
        "payload": {},
        "state": "ready",
        "attempts": 0,
        "max_attempts": 1,
        "available_at": 0.0,
        "lease_epoch": 0,
        "created_at": 0.0,
        "updated_at": 0.0,
    }

    def insert_then_fail() -> None:
        with transaction(engine) as conn:
            conn.execute(work_items.insert().values(**row))
            raise RuntimeError("abandon")

    try:
        with pytest.raises(RuntimeError, match="abandon"):
            insert_then_fail()
        with transaction(engine, write=False) as conn:
            assert conn.execute(text("SELECT count(*) FROM work_items")).scalar_one() == 0
    finally:
        engine.dispose()
