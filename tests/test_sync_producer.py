"""SyncProducer: enqueue from synchronous code, on a psycopg connection, a pool, or inside a
real SQLAlchemy Session or Connection transaction, against a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from pgcg.shared.errors import InvalidInput
from pgcg.shared.producer import SyncProducer
from tests.logclient import logged

sqlalchemy = pytest.importorskip("sqlalchemy", reason="in the test extra")
from sqlalchemy import orm, text  # noqa: E402

TOPIC = "orders"


@pytest.fixture
def engine(dsn: str, db: psycopg.Connection[Any]) -> Iterator[Any]:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    db.execute("CREATE TABLE invoices (id int PRIMARY KEY)")
    engine = sqlalchemy.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    yield engine
    engine.dispose()


def stored(db: psycopg.Connection[Any]) -> tuple[list[int], list[Any]]:
    invoices = [r["id"] for r in db.execute("SELECT id FROM invoices ORDER BY id")]
    return invoices, [r["payload"] for r in logged(db, TOPIC)]


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_a_message_commits_and_rolls_back_with_the_session(
    engine: Any, db: psycopg.Connection[Any], ending: str
) -> None:
    producer = SyncProducer()
    with orm.Session(engine) as session:
        session.execute(text("INSERT INTO invoices VALUES (1)"))
        done = producer.enqueue(TOPIC, "customer-1", {"invoice": 1}, conn=session)
        assert done.id is not None
        # Nothing is visible outside the ORM's transaction before it ends.
        assert stored(db) == ([], [])
        getattr(session, ending)()
    assert stored(db) == (([1], [{"invoice": 1}]) if ending == "commit" else ([], []))


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_a_message_commits_and_rolls_back_with_a_connection(
    engine: Any, db: psycopg.Connection[Any], ending: str
) -> None:
    producer = SyncProducer()
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO invoices VALUES (2)"))
        producer.enqueue(TOPIC, "customer-2", {"invoice": 2}, conn=conn)
        getattr(conn, ending)()
    assert stored(db) == (([2], [{"invoice": 2}]) if ending == "commit" else ([], []))


def test_an_enqueue_alone_begins_the_connections_transaction(
    engine: Any, db: psycopg.Connection[Any]
) -> None:
    # Nothing else ran on the connection: unless the enqueue begins SQLAlchemy's
    # transaction, commit() finds nothing to commit and the pool rolls the message back.
    with engine.connect() as conn:
        SyncProducer().enqueue(TOPIC, "customer-4", {"invoice": 4}, conn=conn)
        conn.commit()
    assert stored(db) == ([], [{"invoice": 4}])


def test_engine_begin_commits_on_exit(engine: Any, db: psycopg.Connection[Any]) -> None:
    with engine.begin() as conn:
        SyncProducer().enqueue(TOPIC, "customer-3", {"invoice": 3}, conn=conn)
    assert stored(db) == ([], [{"invoice": 3}])


def test_a_plain_psycopg_connection_and_a_pool(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    db.execute("CREATE TABLE invoices (id int PRIMARY KEY)")
    with psycopg.connect(dsn) as conn:
        SyncProducer().enqueue(TOPIC, "k", {"n": 1}, conn=conn)
        conn.rollback()
    with ConnectionPool(dsn, min_size=1, open=True) as pool:
        SyncProducer(pool).enqueue(TOPIC, "k", {"n": 2})
    assert stored(db) == ([], [{"n": 2}])


def test_other_drivers_and_objects_are_refused_clearly(dsn: str) -> None:
    with pytest.raises(InvalidInput, match="or create the SyncProducer with a connection pool"):
        SyncProducer().enqueue(TOPIC, "k", 1)
    with pytest.raises(InvalidInput, match="not str"):
        SyncProducer().enqueue(TOPIC, "k", 1, conn=dsn)
