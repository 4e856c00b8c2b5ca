from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Connection, create_engine
from sqlalchemy.orm import sessionmaker

from models import db as models_db
from models.db import driver_url
from tests.support import (
    make_settings,
    migrated_database,
)

# Tests never read the developer's environment for the secret or the database.
os.environ.setdefault("APP_ENV", "test")


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database with the migrations applied, for the whole session."""
    with migrated_database("skillpay_unit") as url:
        yield url


@pytest.fixture
def settings(pg_database):
    return make_settings(pg_database)


class JoinedAutocommit:
    """Stands in for models.db's autocommit engine in a test: the receiver's statement runs
    on the test's connection, in a savepoint, and is rolled back with the rest."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self.connection.begin_nested():
            yield self.connection

    def dispose(self) -> None:
        pass


@pytest.fixture
def session(pg_database, settings):
    """One outer transaction per test, rolled back at the end; code that commits only
    releases a savepoint (warehouse's pattern)."""
    engine = create_engine(driver_url(pg_database))
    connection = engine.connect()
    outer = connection.begin()
    factory = sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )
    # The app's sessions join the test's transaction. configure_database() with the same
    # settings (create_app, make_celery) keeps this engine.
    saved = (
        models_db._engine,
        models_db._autocommit_engine,
        models_db._factory,
        models_db._url,
        models_db._lock_timeout_ms,
    )
    models_db._engine, models_db._factory = engine, factory
    models_db._autocommit_engine = JoinedAutocommit(connection)  # type: ignore[assignment]
    models_db._url, models_db._lock_timeout_ms = settings.database_url, settings.db_lock_timeout_ms
    s = factory()
    yield s
    s.close()
    (
        models_db._engine,
        models_db._autocommit_engine,
        models_db._factory,
        models_db._url,
        models_db._lock_timeout_ms,
    ) = saved
    outer.rollback()
    connection.close()
    engine.dispose()
