"""Connections, and the one place that turns driver errors into pgcg's error types."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import Format
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from pgcg.shared.errors import (
    ConfigError,
    Contention,
    DatabaseUnavailable,
    InvalidInput,
    PgcgError,
    SchemaNotMigrated,
    UnknownTopic,
)

AsyncConn = psycopg.AsyncConnection[dict[str, Any]]

_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]*@")


def redact(dsn: str) -> str:
    """The DSN with any password replaced, safe for logs and error messages."""
    return _PASSWORD.sub(r"\1***@", re.sub(r"(password=)\S+", r"\1***", dsn))


def translate(exc: BaseException, dsn: str | None = None) -> PgcgError | None:
    """The pgcg error for a driver error, or None when it has no better name."""
    if isinstance(exc, PgcgError):
        return exc
    where = f" at {redact(dsn)}" if dsn else ""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "PGC01":
        topic = str(exc).split("unknown topic", 1)[-1].strip().splitlines()[0]
        return UnknownTopic(f"unknown topic {topic}: create it with `pgcg topic create {topic}`")
    if sqlstate == "PGC02":
        return InvalidInput(str(exc).splitlines()[0] + " (the partition count is fixed)")
    if isinstance(exc, pg_errors.InvalidSchemaName | pg_errors.UndefinedTable) or (
        isinstance(exc, pg_errors.UndefinedFunction) and "pgcg." in str(exc)
    ):
        return SchemaNotMigrated(
            f"the pgcg schema is missing or out of date{where}: run `pgcg migrate` first"
        )
    if isinstance(
        exc,
        pg_errors.DeadlockDetected | pg_errors.SerializationFailure | pg_errors.LockNotAvailable,
    ):
        return Contention(f"transient conflict in the database, retrying: {str(exc).strip()}")
    if isinstance(exc, pg_errors.CheckViolation | pg_errors.NotNullViolation):
        return InvalidInput(f"rejected by the database: {str(exc).splitlines()[0]}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError):
        first = (str(exc).strip().splitlines() or ["connection failed"])[0]
        if "invalid dsn" in first or 'missing "="' in first or "invalid URI" in first:
            return ConfigError(f"PGCG_DATABASE_URL is not a valid connection URL: {first}")
        return DatabaseUnavailable(
            f"cannot reach PostgreSQL{where}: {first}. Check PGCG_DATABASE_URL and that "
            "the server is running."
        )
    text = str(exc).lower()
    if isinstance(exc, psycopg.ProgrammingError) and (
        "dsn" in text or "connection info" in text or "uri" in text
    ):
        first = str(exc).strip().splitlines()[0]
        return ConfigError(f"PGCG_DATABASE_URL is not a valid connection URL: {first}")
    return None


@contextlib.contextmanager
def translated(dsn: str | None = None) -> Iterator[None]:
    try:
        yield
    except PgcgError:
        raise
    except (psycopg.Error, OSError) as exc:
        better = translate(exc, dsn)
        if better is None:
            raise
        raise better from exc


_decode_json = json.JSONDecoder().decode


def _loads(data: bytes) -> Any:
    # json.loads(bytes) sniffs the encoding before it decodes; the text PostgreSQL sends
    # is UTF-8 (the sniffing assumed so too), and skipping it halves the cost of the small
    # documents every claimed message carries (its payload and headers).
    return _decode_json(data.decode("utf-8", "surrogatepass"))


async def connect(
    dsn: str,
    *,
    autocommit: bool = True,
    application_name: str = "pgcg",
    through_pooler: bool = False,
) -> AsyncConn:
    """A dedicated connection (heartbeats, leader locks, LISTEN: never a pooled one).

    `through_pooler`: `dsn` goes through a transaction pooler (see pooler.py), so nothing
    is prepared: the next transaction may run on a server connection that never saw it."""
    with translated(dsn):
        conn = await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            application_name=application_name,
            connect_timeout=10,
            prepare_threshold=None if through_pooler else 5,
        )
    if _json_loads_is_default():
        set_json_loads(_loads, conn)
    return conn


def _json_loads_is_default() -> bool:
    """False when the application set its own loads with psycopg's set_json_loads (say,
    floats as Decimal): its payloads are then decoded its way, not ours."""
    oid = psycopg.adapters.types["jsonb"].oid
    return all(
        getattr(psycopg.adapters.get_loader(oid, fmt), "_loads", None) is json.loads
        for fmt in (Format.BINARY, Format.TEXT)
    )


def connect_sync(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[dict[str, Any]]:
    with translated(dsn):
        return psycopg.connect(dsn, autocommit=autocommit, row_factory=dict_row, connect_timeout=10)


async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    name: str = "pgcg",
    through_pooler: bool = False,
) -> AsyncConnectionPool[AsyncConn]:
    async def configure(conn: AsyncConn) -> None:
        await conn.set_autocommit(True)

    pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        kwargs={
            "row_factory": dict_row,
            "application_name": name,
            "connect_timeout": 10,
            "prepare_threshold": None if through_pooler else 5,
        },
        configure=configure,
    )
    with translated(dsn):
        try:
            await pool.open(wait=True, timeout=15)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()  # else its workers keep reconnecting behind our back
            raise
    return pool
