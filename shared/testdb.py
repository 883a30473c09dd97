"""Databases for tests: pgcg's own test suite and the users' pytest plugin
(pgcg.testing_plugin) both get a server, a migrated template and a fresh database per test
from here.

The server is PGCG_TEST_DATABASE_URL's (its user must be allowed to create databases), or
else a throwaway one started for the session (the `demo` extra): the embedded PostgreSQL
18, or with PGCG_TEST_SERVER=15 Debian's PostgreSQL 15 package (or PGCG_TEST_SERVER=/path/to/bin).
No pytest here: a module imported before pytest registers a plugin cannot be rewritten.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgcg.shared.migrate import migrate


@contextmanager
def server() -> Iterator[str]:
    """The admin URL of the test server, stopped on the way out if we started it.
    Raises FileNotFoundError for a PGCG_TEST_SERVER without server binaries and
    MissingExtra without the `demo` extra."""
    url = os.environ.get("PGCG_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from pgcg.bench.throwaway import ThrowawayPostgres, server_bin

    throwaway = ThrowawayPostgres(bin_dir=server_bin(os.environ.get("PGCG_TEST_SERVER")))
    throwaway.start()
    try:
        yield throwaway.url
    finally:
        throwaway.cleanup()


def _admin(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True)


def migrated_template(server_url: str, name: str) -> str:
    """Create database `name` afresh on the server with the pgcg schema; returns `name`."""
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate(make_conninfo(server_url, dbname=name))
    return name


@contextmanager
def fresh_database(server_url: str, template: str) -> Iterator[str]:
    """A new database copied from `template`, dropped on the way out; yields its URL."""
    name = f"pgcg_test_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        # FILE_COPY: for a small template, copying files (and one checkpoint, cheap with
        # fsync off) is faster than WAL-logging every block, and this runs once per test.
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with _admin(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
