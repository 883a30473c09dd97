"""The server a benchmark runs against: a throwaway one, or the caller's (left as found).

On the caller's database the bench needs the pgcg schema already there (`pgcg migrate`),
creates its topics and tables under unique `bench_*` names and drops them afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgcg.bench.throwaway import ThrowawayPostgres, server_bin
from pgcg.shared.db import connect_sync
from pgcg.shared.migrate import check, migrate

SERVER_SETTINGS = ("fsync", "synchronous_commit", "shared_buffers", "max_connections")


@dataclass
class BenchDatabase:
    dsn: str
    throwaway: ThrowawayPostgres | None

    def server_info(self) -> dict[str, Any]:
        with connect_sync(self.dsn) as conn:
            info: dict[str, Any] = {
                "version": conn.execute("SHOW server_version").fetchone()["server_version"],  # type: ignore[index]
                "throwaway": self.throwaway is not None,
            }
            for name in SERVER_SETTINGS:
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                info[name] = row[name] if row else None
        return info

    def enable_statement_stats(self) -> bool:
        """Load pg_stat_statements (a restart of the throwaway server); False if impossible."""
        if self.throwaway is None:
            # The caller's server: use the extension only if it is already there.
            with connect_sync(self.dsn) as conn:
                return _reset_stats(conn)
        with connect_sync(self.dsn) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        self.throwaway.restart()
        with connect_sync(self.dsn) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            return _reset_stats(conn)


def _reset_stats(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT pg_stat_statements_reset()")
    except psycopg.Error:
        return False
    return True


def unique_suffix() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def bench_database(url: str | None, server_spec: str | None = None) -> Iterator[BenchDatabase]:
    """The caller's database, or a throwaway server: the embedded PostgreSQL 18, or with
    `server_spec` another one ("15": Debian's postgresql-15; or a bin/ folder)."""
    if url is not None:
        with connect_sync(url) as conn:
            check(conn)
        yield BenchDatabase(url, None)
        return
    server = ThrowawayPostgres(bin_dir=server_bin(server_spec))
    server.start()
    try:
        migrate(server.url)
        yield BenchDatabase(server.url, server)
    finally:
        server.cleanup()


def drop_topic(dsn: str, topic: str, group: str, *, keep_topic: bool = False) -> None:
    """Remove what a bench run created for one topic and group (only the group's rows
    with `keep_topic`, while other groups of the topic remain)."""
    with connect_sync(dsn, autocommit=False) as conn, conn.transaction():
        conn.execute("DELETE FROM pgcg.consumer_groups WHERE group_name = %s", (group,))
        conn.execute("DELETE FROM pgcg.partition_assignments WHERE group_name = %s", (group,))
        conn.execute("DELETE FROM pgcg.rebalances WHERE group_name = %s", (group,))
        conn.execute("DELETE FROM pgcg.subscriptions WHERE group_name = %s", (group,))
        if keep_topic:
            return
        conn.execute("DELETE FROM pgcg.dead_letters WHERE topic = %s", (topic,))
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS pgcg.{}").format(sql.Identifier(f"messages_{topic}"))
        )
        conn.execute("DELETE FROM pgcg.topics WHERE name = %s", (topic,))
