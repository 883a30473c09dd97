"""Enqueue inside an ORM's transaction: the psycopg connection under a SQLAlchemy Session
or Connection, so a message commits or rolls back with the ORM's own writes.

Only SQLAlchemy's psycopg (3) driver hands out a psycopg Connection
(`create_engine("postgresql+psycopg://...")`); SQLAlchemy itself is never imported here,
so this costs nothing to applications without it.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgcg.shared.errors import InvalidInput


def psycopg_connection(bind: Any) -> psycopg.Connection[Any]:
    """The psycopg Connection a producer should write on, for a psycopg Connection, a
    SQLAlchemy Session (its connection in its current transaction, begun if need be) or
    a SQLAlchemy Connection (its transaction begun if need be)."""
    if isinstance(bind, psycopg.Connection):
        return bind
    if isinstance(bind, psycopg.AsyncConnection):
        raise InvalidInput("an AsyncConnection needs Producer (async), not SyncProducer")
    connection = bind
    if _is_session(bind):
        # Session.connection() begins the session's transaction if none is open and
        # returns the connection its flushes use: the message joins the ORM's writes.
        connection = bind.connection()
    if not hasattr(connection, "in_transaction") or not hasattr(connection, "connection"):
        raise InvalidInput(
            f"conn= takes a psycopg Connection or a SQLAlchemy Session or Connection, "
            f"not {type(bind).__name__}"
        )
    if not connection.in_transaction():
        # A statement sent straight to the driver would start a transaction SQLAlchemy
        # does not know of: its commit() would skip it and the pool would roll it back.
        connection.begin()
    dbapi = connection.connection.dbapi_connection
    if not isinstance(dbapi, psycopg.Connection):
        raise InvalidInput(
            f"the SQLAlchemy engine uses the {type(dbapi).__module__.split('.')[0]} driver; "
            "pgcg needs psycopg 3: create_engine('postgresql+psycopg://...')"
        )
    return dbapi


def _is_session(bind: Any) -> bool:
    # Session and scoped_session both offer connection() and get_bind(); a Connection
    # has neither get_bind nor a callable connection.
    return hasattr(bind, "get_bind") and callable(getattr(bind, "connection", None))
