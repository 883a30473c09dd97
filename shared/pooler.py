"""Which URL each connection uses when a transaction pooler sits in front of PostgreSQL.

Through PgBouncer in transaction mode each transaction may run on another server
connection, so nothing that lives in a session works there: prepared statements (psycopg
prepares a statement it ran five times; PgBouncer 1.18 knows nothing of them), LISTEN, and
session advisory locks (the coordinator's leader lock would stay on a server connection
other clients go on using, and a standby deposing a silent leader would terminate one of
theirs). So pgcg keeps two URLs: PGCG_DATABASE_URL for everything else, pooled or not, and
PGCG_SESSION_DATABASE_URL, direct, for the leader lock and LISTEN.

Detection (PGCG_POOLER=auto): a pooler answers the client's startup itself, with a
BackendKeyData of its own making, so the process id libpq reports is not the backend's
pg_backend_pid(). A TCP proxy passes the server's own through. One query on one
connection, once per process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.errors import ConfigError
from pgcg.shared.settings import Settings

log = logging.getLogger("pgcg.pooler")


@dataclass(frozen=True)
class Route:
    dsn: str  # everything that works one transaction at a time
    session_dsn: str | None  # LISTEN and session locks; None: not available
    pooled: bool  # dsn goes through a transaction pooler: prepare nothing on it


async def behind_pooler(conn: AsyncConn) -> bool:
    row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
    return row is not None and row["pid"] != conn.info.backend_pid


def behind_pooler_sync(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    pid = row["pg_backend_pid"] if isinstance(row, dict) else row[0] if row else None
    return pid is not None and pid != conn.info.backend_pid


async def _detect(dsn: str) -> bool:
    conn = await connect(dsn, application_name="pgcg-detect", through_pooler=True)
    async with conn:
        with translated(dsn):
            return await behind_pooler(conn)


async def route(settings: Settings, dsn: str) -> Route:
    """Where this process's connections go, from the settings (and one probe for auto)."""
    pooled = settings.pooler == "transaction" or (settings.pooler == "auto" and await _detect(dsn))
    session = settings.session_dsn()
    if session is not None and settings.pooler == "auto" and await _detect(session):
        raise ConfigError(
            "PGCG_SESSION_DATABASE_URL goes through a connection pooler too: point it at "
            "PostgreSQL itself (or set PGCG_POOLER=none if that pooler keeps sessions)"
        )
    if session is None and not pooled:
        session = dsn
    return Route(dsn, session, pooled)


def adjust(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """For a CLI connection opened already: prepare nothing on it if it is pooled."""
    pooled = settings.pooler == "transaction" or (
        settings.pooler == "auto" and behind_pooler_sync(conn)
    )
    if pooled:
        conn.prepare_threshold = None
