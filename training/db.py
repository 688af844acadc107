"""The job store's database: one engine per URL, the tables, and a transaction helper.

SQLite (a file under ``$LOOM_HOME``) is the embedded default; PostgreSQL is for a cluster.
Both go through SQLAlchemy Core, so the same statements run on each:

    engine = create_db_engine(env.db_url)
    create_tables(engine)
    with transaction(engine) as conn:
        conn.execute(...)

Every table of the store is declared here, on one ``metadata``, so one ``create_all`` makes
the whole store. Times are float seconds since the epoch, written from the caller's clock and
never from the database's ``now()``: an injected clock then drives expiry in tests, and
SQLite and Postgres agree on the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    make_url,
)
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

metadata = MetaData()

# BIGINT on Postgres; on SQLite only "INTEGER PRIMARY KEY" is the auto-incrementing rowid.
_id_type = BigInteger().with_variant(Integer(), "sqlite")

work_items = Table(
    "work_items",
    metadata,
    Column("id", _id_type, primary_key=True, autoincrement=True),
    Column("queue", String(200), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("available_at", Float, nullable=False),
    Column("lease_owner", String(200)),
    Column("lease_epoch", Integer, nullable=False, default=0),
    Column("lease_expires_at", Float),
    Column("result", JSON),
    Column("last_error", Text),
    Column("idempotency_key", String(200)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # NULL keys are distinct on both databases, so only keyed puts are deduplicated
    UniqueConstraint("queue", "idempotency_key", name="uq_work_items_queue_key"),
    Index("ix_work_items_ready", "queue", "state", "available_at", "id"),
    Index("ix_work_items_lease_expiry", "state", "lease_expires_at"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    # the client's Idempotency-Key scoped to its owner (``jobs.scoped_idempotency_key``)
    Column("idempotency_key", String(200), unique=True),
    # the principal that submitted the job (``training.callers``); NULL: submitted before
    # jobs had owners, seen by admin keys only. Added to an older store by ``create_tables``.
    Column("owner", String(128)),
    Column("name", String(128), nullable=False),
    Column("trainer", String(64), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("stage", String(64)),
    Column("priority", Integer, nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("metrics", JSON, nullable=False),
    Column("error", Text),
    # the seq of the job's latest event; the next event takes last_event_seq + 1
    Column("last_event_seq", Integer, nullable=False, default=0),
    Column("webhook_url", Text),  # the spec's, copied so the deliverer can select on it
    # the seq of the latest event the webhook has taken (or given up on); 0: none yet
    Column("webhook_seq", Integer, nullable=False, default=0),
    # the seq of the job's latest log line
    Column("last_log_seq", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Index("ix_jobs_state_order", "state", "priority", "created_at"),
)

# One row per job state change, numbered 1, 2, 3, ... within its job: the source of the job's
# CloudEvents (SSE, webhooks), read with "after seq".
job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("type", String(64), nullable=False),
    Column("time", Float, nullable=False),
    Column("data", JSON, nullable=False),
)

# A job's webhook signing secret (``training.webhook_signing``), apart from ``jobs`` so no read
# of a job selects it by accident; only the deliverer reads it. A table of its own is also
# created in a store made before it existed (``create_tables`` adds missing tables only).
job_webhook_secrets = Table(
    "job_webhook_secrets",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("secret", Text, nullable=False),
)

# The job's log: lines its stages and workers write, numbered 1, 2, 3, ... within the job
# (``GET /v1/jobs/{id}/logs?after=seq``).
job_logs = Table(
    "job_logs",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("time", Float, nullable=False),
    Column("stage", String(64)),
    Column("message", Text, nullable=False),
)

# Ownership election (``training.leases``): one row per role, its holder until expires_at;
# epoch grows with every change of holder (the fencing token).
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

# Fencing tokens for leases that live outside the store (``training.fences``; Kubernetes
# ``Lease`` objects): one row per role, the highest epoch that has written on its behalf.
fences = Table(
    "fences",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("epoch", BigInteger, nullable=False),
)

_SQLITE_BEGIN_OPTION = "loom_sqlite_begin"
POSTGRES_CONNECT_TIMEOUT_S = 10


def create_db_engine(
    url: str, *, schema: str | None = None, sqlite_busy_timeout_ms: int = 5000
) -> Engine:
    """An engine for ``url``, set up for the store's concurrency on that database.

    SQLite: WAL (readers don't block the one writer), a busy timeout (a writer waits for the
    lock instead of failing at once), foreign keys on, and transactions begun by us (see
    ``transaction``), not by the driver. Postgres: pool pre-ping, so a connection dropped by a
    restarted server is replaced rather than failing the next statement, and a connect timeout
    (``POSTGRES_CONNECT_TIMEOUT_S`` unless the URL sets ``connect_timeout``), so a server that
    is away fails a call in seconds instead of hanging it on the network's timeout.

    ``schema`` puts every table in that Postgres schema (tests use one per run).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)  # first start: no folder
        _configure_sqlite(engine, busy_timeout_ms=sqlite_busy_timeout_ms)
    else:
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in make_url(url).query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if schema is not None:
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


def _configure_sqlite(engine: Engine, *, busy_timeout_ms: int) -> None:
    # pysqlite opens transactions lazily and never as BEGIN IMMEDIATE; SQLAlchemy's documented
    # recipe turns the driver's handling off and emits BEGIN itself.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class TransientError(Exception):
    """A failure of a service other than the database that a later try may get past (the
    Kubernetes API server answering 503, say). Their clients raise subclasses of it, so
    ``is_transient_error`` knows them without this module importing those clients."""


def is_transient_error(exc: BaseException) -> bool:
    """True when a later try of the same statement may succeed: the database was away, locked
    or busy, or dropped the connection (``OperationalError``, a connection SQLAlchemy marked
    invalidated, the pool timing out, a socket error). False for what will fail the same way
    every time: a refused row (``IntegrityError``), bad SQL or data (``ProgrammingError``,
    ``DataError``), a value the driver cannot bind, any other exception (a bug). A
    ``TransientError`` (another service away or busy) counts as transient too.

    SQLite reports a lock wait past its busy timeout and a missing table alike as
    ``OperationalError``; both count as transient (the tables are made at start).
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    transient = (
        OperationalError,
        InterfaceError,  # psycopg: the connection was closed under the statement
        DisconnectionError,
        PoolTimeoutError,
        ConnectionError,
        TimeoutError,
        TransientError,
    )
    return isinstance(exc, transient)


ADDED_COLUMNS: tuple[tuple[Table, str, str], ...] = ((jobs, "owner", "VARCHAR(128)"),)
"""Columns added after a table's first release: (table, column, SQL type). ``create_all``
makes missing tables only, so ``create_tables`` adds these to a table that lacks them."""


def create_tables(engine: Engine) -> None:
    """Create every table of the store that is missing, and add the columns of
    ``ADDED_COLUMNS`` an older store's tables lack (idempotent; SQLite and Postgres)."""
    schema = (engine.get_execution_options().get("schema_translate_map") or {}).get(None)
    with engine.begin() as conn:
        metadata.create_all(conn)
        for table, column, sql_type in ADDED_COLUMNS:
            present = {c["name"] for c in inspect(conn).get_columns(table.name, schema=schema)}
            if column in present:
                continue
            quote = conn.dialect.identifier_preparer.quote
            where = f"{quote(schema)}.{quote(table.name)}" if schema else quote(table.name)
            conn.exec_driver_sql(f"ALTER TABLE {where} ADD COLUMN {quote(column)} {sql_type}")


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Connection]:
    """One transaction: commits when the block ends, rolls back if it raises.

    ``write=True`` on SQLite begins with ``BEGIN IMMEDIATE``, taking the database's one write
    lock up front; two writers then queue on the busy timeout instead of both reading, both
    trying to upgrade, and one failing with "database is locked". Postgres ignores it (row
    locks, ``FOR UPDATE SKIP LOCKED``, do that work there).
    """
    with engine.connect() as conn:
        if write and engine.dialect.name == "sqlite":
            conn.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        with conn.begin():
            yield conn
