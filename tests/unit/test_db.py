"""The database plumbing against PostgreSQL: a pooled connection that died while idle is
replaced before use, without a ping on every checkout."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from models import db as models_db
from models.db import driver_url


def backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def kill(url: str, pid: int) -> None:
    """What a database restart does to a pooled connection: its server process goes away."""
    killer = create_engine(driver_url(url))
    with killer.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()
    killer.dispose()


@pytest.fixture
def engine(pg_database):
    engine = models_db.make_engine(pg_database)
    yield engine
    engine.dispose()


def test_a_connection_that_died_while_idle_is_replaced_before_use(engine, pg_database, monkeypatch):
    first = backend_pid(engine)
    kill(pg_database, first)
    monkeypatch.setattr(models_db, "IDLE_PING_SECONDS", 0.0)  # as if idle for long
    assert backend_pid(engine) != first  # pinged, found dead, connected again


def test_a_connection_in_steady_use_is_not_pinged(engine, pg_database, monkeypatch):
    """The other side of the trade: no ping on a connection used a moment ago, so its death
    is found by the statement itself, which fails (a 503, or a stage retried), and the pool
    then replaces it."""
    first = backend_pid(engine)
    kill(pg_database, first)
    monkeypatch.setattr(models_db, "IDLE_PING_SECONDS", 3600.0)
    with pytest.raises(OperationalError):
        backend_pid(engine)
    assert backend_pid(engine) != first
