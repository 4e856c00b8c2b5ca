from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from config import reset_settings
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
    s = make_settings(pg_database)
    reset_settings(s)
    yield s
    reset_settings(None)


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
    saved = (models_db._engine, models_db._factory)
    models_db._engine, models_db._factory = engine, factory
    s = factory()
    yield s
    s.close()
    models_db._engine, models_db._factory = saved
    outer.rollback()
    connection.close()
    engine.dispose()
