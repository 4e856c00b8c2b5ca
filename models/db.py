"""Engine, sessions, and the after-commit hook that every enqueue goes through."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None
# Set once per process by configure_database() from the settings the process was started with.
_url: str | None = None
_lock_timeout_ms = 5000


def driver_url(url: str) -> str:
    """psycopg2 is the driver we ship; SQLAlchemy 2.1 would otherwise pick psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(url: str, lock_timeout_ms: int = 5000) -> Engine:
    url = driver_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

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
    return create_engine(
        url,
        # Batched UPDATEs (psycopg2 execute_batch) as well as batched INSERTs: a bulk approval
        # updates hundreds of rows per transaction.
        executemany_mode="values_plus_batch",
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"options": options, "connect_timeout": 5},
    )


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
    """Drop the engine (after a fork); the next use makes a new one."""
    global _engine, _factory
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _factory = None


def new_session() -> Session:
    get_engine()
    assert _factory is not None
    return _factory()


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
