"""Connections, and the one place that turns driver errors into pgcg's error types."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from pgcg.shared.errors import (
    ConfigError,
    Contention,
    DatabaseUnavailable,
    InvalidInput,
    PermissionDenied,
    PgcgError,
    SchemaNotMigrated,
    StatementFailed,
    UnknownGroup,
    UnknownTopic,
)
from pgcg.shared.grants import advice as grants_on
from pgcg.shared.redaction import clean_driver_message, misread_url, parse, redact, remember

__all__ = [
    "AsyncConn",
    "bounded",
    "connect",
    "connect_sync",
    "liveness",
    "open_pool",
    "redact",
    "translate",
]

AsyncConn = psycopg.AsyncConnection[dict[str, Any]]
T = TypeVar("T")

# The session timeout of a process that does not say (Settings' default).
DEFAULT_SESSION_TIMEOUT = 10.0

# libpq's words for a connection string it parsed but whose values it refuses (a bad
# sslmode, a port that is not a number): settings to fix, not an outage to wait out.
_BAD_SETTING = re.compile(
    r"invalid (connection option|integer value|port number|[\w ]+ value)|could not match \d+"
    r"|protocol version range|not compiled in"
)
# The server (clientcert=verify-full, or the cert method) refused what the client sent.
_CLIENT_CERT_REFUSED = (
    "requires a valid client certificate",
    "certificate authentication failed",
    "certificate validation (clientcert=verify-full) failed",
    "tlsv1 alert unknown ca",
    "sslv3 alert certificate",
)
# The TLS files libpq was told to use are missing or unusable.
_BAD_TLS_FILES = (
    "root certificate file",
    "could not read certificate",
    "could not open certificate",
    "could not load private key",
    "private key file",
    "certificate file",
    "could not load ssl certificate",
)
# The server's certificate is not the one the client was told to trust.
_TLS_REFUSED = (
    "certificate verify failed",
    "does not match host name",
    "server certificate for",
    "self-signed certificate",
    "unable to get local issuer certificate",
)


def translate(exc: BaseException, dsn: str | None = None) -> PgcgError | None:
    """The pgcg error for a driver error, or None when it has no better name."""
    if isinstance(exc, PgcgError):
        return exc
    where = f" at {redact(dsn)}" if dsn else ""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "PGC01":
        topic = str(exc).split("unknown topic", 1)[-1].strip().splitlines()[0]
        return UnknownTopic(f"unknown topic {topic}: create it with `pgcg topic create {topic}`")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return _permission_denied(str(exc), dsn)
    if sqlstate == "PGC02":
        return InvalidInput(str(exc).splitlines()[0] + " (the partition count is fixed)")
    if sqlstate in ("PGC03", "PGC08", "PGC09"):  # bad input, nothing written
        return InvalidInput(str(exc).strip().splitlines()[0])
    if sqlstate == "PGC04":
        return UnknownGroup(str(exc).strip().splitlines()[0] + ": check the group name")
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
    if isinstance(exc, pg_errors.IdleInTransactionSessionTimeout):
        # The server ended the session (a transaction bounded so, stalled): it is gone.
        return _connection_error(exc, dsn, where)
    if isinstance(exc, psycopg.OperationalError) and not _connection_class(sqlstate):
        # A statement the server refused (a limit, resources of one query): retrying the
        # same statement fails the same way, so it must not read as an outage.
        return StatementFailed(f"the database refused a statement: {_first_line(exc, dsn)}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError):
        return _connection_error(exc, dsn, where)
    text = str(exc).lower()
    if isinstance(exc, psycopg.ProgrammingError) and (
        "dsn" in text or "connection info" in text or "uri" in text or "percent-encod" in text
    ):
        return ConfigError(
            f"PGCG_DATABASE_URL is not a valid connection URL: {_first_line(exc, dsn)}"
        )
    return None


def _connection_class(sqlstate: str | None) -> bool:
    """Whether an error means "the connection or the server is not there right now": no
    SQLSTATE (the socket), class 08 (connection exception), a server shutting down or
    restarting (57P01-57P05), too many connections (53300), or a statement timeout
    (57014: the same statement may well finish in time later)."""
    return (
        sqlstate is None
        or sqlstate.startswith("08")
        or sqlstate in ("57P01", "57P02", "57P03", "57P04", "57P05", "53300", "57014")
    )


# What each kind of object needs, by the word PostgreSQL's message uses for it. A table's
# message does not say which of its privileges the statement wanted.
_PRIVILEGE_FOR = {
    "schema": "USAGE",
    "function": "EXECUTE",
    "procedure": "EXECUTE",
    "routine": "EXECUTE",
    "sequence": "USAGE",
    "database": "CONNECT",
    "view": "SELECT",
}
_DENIED_FOR = re.compile(r'permission denied for (large object|\w+) ("[^"]*"|\S+)')


def _permission_denied(message: str, dsn: str | None) -> PermissionDenied:
    """One line naming the object and the privilege the role lacks."""
    first = (message.strip().splitlines() or ["permission denied"])[0]
    first = first.rpartition("FATAL: ")[2].removeprefix("connection is bad: ").strip()
    role = parse(dsn)[0] if dsn else None
    who = f"role {role['user']!r}" if role and role.get("user") else "the database role"
    fix = "grant it to the role this process connects as (docs/security.md lists what each needs)"
    denied = _DENIED_FOR.search(first)
    if denied:
        kind, name = denied.group(1), denied.group(2).strip('"').rstrip(".")
        privilege = _PRIVILEGE_FOR.get(kind)
        grants = grants_on(kind, name)
        if kind in ("group", "topic"):  # pgcg's bindings (sql/migrations/0004_definer.sql)
            how = (
                f"pgcg roles consumer <role> --group {name} --topic <its topic>"
                if kind == "group"
                else f"pgcg roles producer <role> --topic {name}"
            )
            return PermissionDenied(
                f"{who} is not bound to {kind} {name}. PostgreSQL: {denied.group(0)}; bind "
                f"it with `{how}` (docs/security.md)"
            )
        if grants is not None:
            fix = grants
        if privilege:
            what = f"{privilege} on {kind} {name}"
        elif grants is not None:
            what = f"a privilege on {kind} {name}"
        else:
            what = (
                f"a privilege on {kind} {name} (SELECT, INSERT, UPDATE or DELETE: the one "
                "this step uses)"
            )
        return PermissionDenied(f"{who} lacks {what}. PostgreSQL: {denied.group(0)}; {fix}")
    if "terminate" in first or "signal" in first:
        return PermissionDenied(
            f"{who} may not terminate another role's backend. PostgreSQL: {first}; grant it "
            "membership in pg_signal_backend, or run every coordinator as one role "
            "(docs/security.md)"
        )
    return PermissionDenied(f"{who} lacks a privilege. PostgreSQL: {first}; {fix}")


def _first_line(exc: BaseException, dsn: str | None, default: str = "") -> str:
    """libpq's message, first line, with every piece of a secret in it masked."""
    first = (str(exc).strip().splitlines() or [default])[0].removeprefix("connection is bad: ")
    return clean_driver_message(first, dsn)


def _connection_error(exc: BaseException, dsn: str | None, where: str) -> PgcgError:
    first = _first_line(exc, dsn, "connection failed")
    # The whole message: libpq puts the TLS reason after a "connection to server ... failed"
    # line, and several hosts' failures one per line.
    text = clean_driver_message(" ".join(str(exc).split()), dsn)
    lowered = text.lower()
    if "permission denied for" in lowered:  # no CONNECT on the database
        return _permission_denied(text, dsn)
    if dsn is not None and misread_url(dsn):
        return ConfigError(
            "PGCG_DATABASE_URL has an unencoded @ or / in its user name or password, so "
            "libpq reads part of it as the host, port or database: percent-encode them "
            "(@ as %40, / as %2F, : in a user name as %3A)"
        )
    if "invalid dsn" in lowered or 'missing "="' in lowered or "invalid uri" in lowered:
        return ConfigError(f"PGCG_DATABASE_URL is not a valid connection URL: {first}")
    if _BAD_SETTING.search(lowered):
        return ConfigError(f"PGCG_DATABASE_URL has a setting libpq refuses: {first}")
    if any(words in lowered for words in _TLS_REFUSED):
        return ConfigError(
            f"the server's TLS certificate was refused{where}: {_tls_reason(text)}. Check "
            "that sslrootcert names the CA that signed the server's certificate and that "
            "the host name in PGCG_DATABASE_URL is one the certificate was issued for."
        )
    if any(words in lowered for words in _CLIENT_CERT_REFUSED):
        return ConfigError(
            f"the server wants a client certificate it trusts{where}: {_tls_reason(text)}. "
            "Set sslcert and sslkey to a certificate issued to the database user by a CA "
            "in the server's ssl_ca_file."
        )
    if "no encryption" in lowered:
        return ConfigError(
            f"the server refuses connections without TLS{where}: set sslmode=verify-full "
            "and sslrootcert to the CA that signed the server's certificate"
        )
    if any(words in lowered for words in _BAD_TLS_FILES):
        return ConfigError(f"a TLS file in PGCG_DATABASE_URL cannot be used: {_tls_reason(text)}")
    return DatabaseUnavailable(
        f"cannot reach PostgreSQL{where}: {first}. Check PGCG_DATABASE_URL and that "
        "the server is running."
    )


def _tls_reason(text: str) -> str:
    """The part of libpq's message after `connection to server at ... failed:`."""
    return text.rpartition(" failed: ")[2].strip().rstrip(".") or text


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


def liveness(dsn: str, session_timeout: float = DEFAULT_SESSION_TIMEOUT) -> dict[str, Any]:
    """Connection settings that find a dead peer within about `session_timeout`.

    Without them a connection whose packets are dropped (a black-holed link, a host gone
    without a reset) blocks its reader for the kernel's retransmission timeout, about 15
    minutes, long after the member's lease and its partitions are gone. Keepalives probe
    an idle connection (idle + count * interval < the session timeout), tcp_user_timeout
    drops one whose sent data goes unacknowledged. Whatever the URL sets itself wins.
    """
    given = conninfo_to_dict(dsn)
    timeout = max(session_timeout, 3.0)
    # libpq takes whole seconds: at short timeouts fewer probes, so the sum still fits.
    idle = max(1, int(timeout / 3))
    interval = max(1, int(timeout / 6))
    wanted: dict[str, Any] = {
        "connect_timeout": max(2, min(10, round(timeout))),
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": max(1, min(3, int((timeout - idle) / interval))),
    }
    if psycopg.pq.version() >= 120000:  # older libpq refuses the option
        wanted["tcp_user_timeout"] = int(timeout * 1000)
    return {k: v for k, v in wanted.items() if k not in given}


def check_columns(description: Sequence[Any] | None, columns: Sequence[str]) -> None:
    """Rows unpacked by position must come in the order the code expects: a statement
    edited out of step with the code that reads it would otherwise mix up fields silently."""
    names = tuple(c.name for c in description or ())
    if names != tuple(columns):
        raise RuntimeError(f"the statement returned columns {names}, the reader expects {columns}")


async def bounded(conn: AsyncConn, seconds: float, call: Callable[[], Awaitable[T]]) -> T:
    """`call()` (a round trip on `conn`), or DatabaseUnavailable if no answer came within
    `seconds`; the connection is then unusable and must be closed.

    The socket is shut down rather than the call cancelled: a cancelled psycopg call first
    tries to cancel the query on the server, which over a dead link waits out its own
    timeouts (10 s) before giving up.
    """
    timed_out = False

    def sever() -> None:
        nonlocal timed_out
        timed_out = True
        with contextlib.suppress(OSError, psycopg.Error):
            sock = socket.socket(fileno=conn.pgconn.socket)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()  # the descriptor stays libpq's

    # A timer on the loop rather than a task to sleep and be cancelled: this runs for
    # every round trip of the reader and the writer, and the task cost more than the round
    # trip's own Python work. psycopg's async connections run on asyncio alone.
    timer = asyncio.get_running_loop().call_later(seconds, sever)
    try:
        return await call()
    except (PgcgError, psycopg.Error, OSError) as exc:
        if timed_out:
            raise DatabaseUnavailable(
                f"no answer from PostgreSQL within {seconds:g}s: connection dropped"
            ) from exc
        raise
    finally:
        timer.cancel()


async def connect(
    dsn: str,
    *,
    autocommit: bool = True,
    application_name: str = "pgcg",
    through_pooler: bool = False,
    session_timeout: float = DEFAULT_SESSION_TIMEOUT,
) -> AsyncConn:
    """A dedicated connection (heartbeats, leader locks, LISTEN: never a pooled one).

    `through_pooler`: `dsn` goes through a transaction pooler (see pooler.py), so nothing
    is prepared: the next transaction may run on a server connection that never saw it.
    `session_timeout`: a dead connection is noticed within about this (see liveness)."""
    remember(dsn)
    with translated(dsn):
        conn = await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            application_name=application_name,
            prepare_threshold=None if through_pooler else 5,
            **liveness(dsn, session_timeout),
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


def connect_sync(
    dsn: str, *, autocommit: bool = True, session_timeout: float = DEFAULT_SESSION_TIMEOUT
) -> psycopg.Connection[dict[str, Any]]:
    remember(dsn)
    with translated(dsn):
        return psycopg.connect(
            dsn, autocommit=autocommit, row_factory=dict_row, **liveness(dsn, session_timeout)
        )


async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    name: str = "pgcg",
    through_pooler: bool = False,
    session_timeout: float = DEFAULT_SESSION_TIMEOUT,
) -> AsyncConnectionPool[AsyncConn]:
    async def configure(conn: AsyncConn) -> None:
        await conn.set_autocommit(True)

    remember(dsn)
    with translated(dsn):
        alive = liveness(dsn, session_timeout)
    pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        kwargs={
            "row_factory": dict_row,
            "application_name": name,
            "prepare_threshold": None if through_pooler else 5,
            **alive,
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
