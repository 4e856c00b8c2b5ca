"""Engine, sessions, and the after-commit hook that every enqueue goes through."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, exc, insert, text
from sqlalchemy.orm import Session, sessionmaker

_engine: Engine | None = None
_autocommit_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None
# Set once per process by configure_database() from the settings the process was started with.
_url: str | None = None
_lock_timeout_ms = 5000
# A pooled connection idle for longer than this is checked before use (see _ping_if_idle).
IDLE_PING_SECONDS = 2.0


def driver_url(url: str) -> str:
    """psycopg2 is the driver we ship; SQLAlchemy 2.1 would otherwise pick psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(url: str, lock_timeout_ms: int = 5000, **kwargs: Any) -> Engine:
    url = driver_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # A stage waiting on a row lock gives up after lock_timeout and is retried, rather than
    # holding a worker forever; a connection left idle inside a transaction is closed.
    options = f"-c lock_timeout={lock_timeout_ms} -c idle_in_transaction_session_timeout=60000"
    engine = create_engine(
        url,
        # Batched UPDATEs (psycopg2 execute_batch) as well as batched INSERTs: a bulk approval
        # updates hundreds of rows per transaction.
        executemany_mode="values_plus_batch",
        pool_size=5,
        max_overflow=10,
        connect_args={"options": options, "connect_timeout": 5},
        **kwargs,
    )
    _ping_if_idle(engine)
    return engine


def _ping_if_idle(engine: Engine) -> None:
    """Check a pooled connection before use only if it sat idle for IDLE_PING_SECONDS.

    pool_pre_ping checks every checkout: a round trip per request or stage, a quarter of the
    receiver's time under load. A connection in steady use needs none; one that sat idle
    across a database restart is found dead here and replaced (DisconnectionError makes the
    pool connect again). A connection that dies while in use fails its statement; SQLAlchemy
    then invalidates the whole pool, so only that transaction fails (503, or a stage retry).
    """

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as error:
            raise exc.DisconnectionError(str(error)) from error
        if not alive:
            raise exc.DisconnectionError("the connection did not answer a ping")


def configure_database(database_url: str, lock_timeout_ms: int = 5000) -> None:
    """Point this process at a database. The web app, the worker and the CLI call it with
    their settings; the engine itself is made on first use (after a worker's fork)."""
    global _url, _lock_timeout_ms
    if database_url != _url or lock_timeout_ms != _lock_timeout_ms:
        reset_engine()
    _url, _lock_timeout_ms = database_url, lock_timeout_ms


def get_engine() -> Engine:
    global _engine, _factory
    if _engine is None:
        if _url is None:
            raise RuntimeError("no database: models.configure_database() was not called")
        _engine = make_engine(_url, _lock_timeout_ms)
        _factory = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def reset_engine() -> None:
    """Drop the engines (after a fork); the next use makes new ones."""
    global _engine, _autocommit_engine, _factory
    for engine in (_engine, _autocommit_engine):
        if engine is not None:
            engine.dispose()
    _engine = _autocommit_engine = None
    _factory = None


def new_session() -> Session:
    get_engine()
    assert _factory is not None
    return _factory()


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection on which each statement commits by itself, durably: a one-statement write
    costs one round trip, without BEGIN and COMMIT (the webhook receiver's inbox insert).

    Its own small pool of connections made in autocommit mode: switching a pooled
    connection's mode on every checkout and back on return costs more than the insert."""
    global _autocommit_engine
    if _autocommit_engine is None:
        if _url is None:
            raise RuntimeError("no database: models.configure_database() was not called")
        _autocommit_engine = make_engine(_url, _lock_timeout_ms, isolation_level="AUTOCOMMIT")
    with _autocommit_engine.connect() as conn:
        yield conn


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, always close."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# Fewer rows than this go in as bound VALUES with RETURNING: one statement, not two.
FEW_ROWS = 50


def insert_many(session: Session, table: Table, rows: list[dict[str, Any]]) -> list[int]:
    """Insert rows (column values by name, the same columns in each) and return their new
    ids, in the rows' order. A column left out gets the model's default, as with insert().

    On PostgreSQL two statements, however many rows: ids drawn from the table's sequence,
    then every row in one JSON document that jsonb_populate_recordset() turns into the
    table's row type. A batch of a thousand rows as bound VALUES is thousands of parameters
    for the client to render and the server to parse; as one document it is neither.
    """
    if not rows:
        return []
    if len(rows) < FEW_ROWS or session.get_bind().dialect.name != "postgresql":
        returning = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        return list(session.execute(returning, rows).scalars())
    ids = list(
        session.execute(
            text(
                "SELECT nextval(CAST(seq AS regclass)) FROM generate_series(1, :n), "
                "(SELECT pg_get_serial_sequence(:t, 'id') AS seq) s"
            ),
            {"t": table.name, "n": len(rows)},
        ).scalars()
    )
    ids.sort()
    defaults = _python_defaults(table, rows[0])
    document = json.dumps(
        [{**defaults, **row, "id": row_id} for row, row_id in zip(rows, ids, strict=True)],
        default=_isoformat,
    )
    columns = ", ".join(table.c[name].name for name in ("id", *defaults, *rows[0]))
    session.execute(
        text(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM "  # noqa: S608 - ours
            f"jsonb_populate_recordset(NULL::{table.name}, CAST(:rows AS jsonb))"
        ),
        {"rows": document},
    )
    return ids


def _python_defaults(table: Table, given: dict[str, Any]) -> dict[str, Any]:
    """The values the model's Python-side defaults (created_at's utcnow, a 0, an empty dict)
    give the columns the rows leave out: SQLAlchemy applies them to an INSERT it renders
    itself, not to one fed from a JSON document."""
    values: dict[str, Any] = {}
    for column in table.columns:
        default = column.default
        if column.name in given or column.name == "id" or default is None:
            continue
        if default.is_scalar:  # type: ignore[attr-defined]
            values[column.name] = default.arg  # type: ignore[attr-defined]
        elif default.is_callable:  # type: ignore[attr-defined]
            values[column.name] = default.arg(None)  # type: ignore[attr-defined]
    return values


def _isoformat(value: Any) -> str:
    if hasattr(value, "isoformat"):
        return value.isoformat()  # type: ignore[no-any-return]
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def on_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run callback once the session's transaction has committed; drop it on rollback.

    Every message to the broker is sent from here, so a worker never sees an id whose row is
    not yet committed, and a rolled-back change never sends one.
    """
    session.info.setdefault("on_commit", []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_on_commit(session: Session) -> None:
    callbacks = session.info.pop("on_commit", [])
    for callback in callbacks:
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_on_commit(session: Session) -> None:
    session.info.pop("on_commit", None)
