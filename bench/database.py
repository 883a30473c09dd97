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
from pgcg.shared.queries import Queries

Q = Queries("bench")

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
    """Remove what a bench run created for one topic and group (only the group, while
    other groups of the topic remain, with `keep_topic`)."""
    with connect_sync(dsn, autocommit=False) as conn, conn.transaction():
        conn.execute(Q.drop_group, {"group": group})
        if not keep_topic:
            remove_topic(conn, topic)


def remove_topic(conn: psycopg.Connection[Any], topic: str) -> None:
    """A topic a bench made up, with every group still on it and what its log holds."""
    params = {"topic": topic}
    for row in conn.execute(Q.topic_groups, params).fetchall():
        conn.execute(Q.drop_group, {"group": row["group_name"]})
    conn.execute(Q.drop_dead_letters, params)
    found = conn.execute(Q.topic_relations, params).fetchone()
    if found is not None:
        # Identifiers cannot be parameters; every name here passed pgcg's topic-name check.
        for parent in (found["log"], found["ledger"]):
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier("pgcg", parent))
            )
        for seq in found["sequences"]:
            conn.execute(sql.SQL("DROP SEQUENCE IF EXISTS {}").format(sql.Identifier("pgcg", seq)))
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}").format(sql.Identifier("pgcg", found["reader"]))
        )
    conn.execute(Q.drop_topic_row, params)


def unfinished(conn: psycopg.Connection[Any], topic: str) -> dict[str, int]:
    """Messages each group of `topic` has not finished (see the query)."""
    rows = conn.execute(Q.unfinished, {"topic": topic}).fetchall()
    return {r["group_name"]: int(r["unfinished"]) for r in rows}
