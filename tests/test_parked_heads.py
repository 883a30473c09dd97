"""The parked queue's head flags (sql/migrations/0006_parked_heads.sql): the first row of
every (group, partition, key) is flagged, whatever writes or deletes rows, also when an
insert and a delete of the same key race in two transactions. Extra flags are allowed
(load_parked filters them out); a missing one would strand its key.

Races are played with real connections: a statement that must not wait runs under a
lock_timeout, so a wait fails the test at once; one that must wait runs in a thread, and
the test waits (with a deadline) until the server shows it waiting for a lock.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg.shared.migrate import MIGRATION_LOCK, migrate, migrations
from pgcg.shared.queries import Queries
from tests.helpers import wait_for

pytestmark = pytest.mark.pg15

MIGRATE = Queries("migrate")
TOPIC, GROUP = "orders", "billing"
Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def group_id(db: Conn) -> int:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    row = db.execute("SELECT id FROM pgcg.groups WHERE group_name = %s", (GROUP,)).fetchone()
    assert row is not None
    return int(row["id"])


@pytest.fixture
def connect(dsn: str) -> Iterator[Callable[[], Conn]]:
    """More connections to the test database, each in a transaction until it commits (a
    lock wait longer than a few seconds is an error, never a hang)."""
    opened: list[Conn] = []

    def open_one() -> Conn:
        conn = psycopg.connect(dsn, row_factory=dict_row)
        conn.execute("SET lock_timeout = '10s'")
        conn.commit()
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


_offsets = iter(range(1, 1_000_000))


def park(conn: Conn, group_id: int, key: str, *, partition: int = 0, claimed: bool = False) -> int:
    """One parked message of `key` (as settle parks one), its id."""
    row = conn.execute(
        """
        INSERT INTO pgcg.parked (group_id, partition, gen, "offset", tick, key, payload,
                                 enqueued_at, available_at, attempts, origin, claimed_epoch)
        VALUES (%s, %s, 0, %s, 1, %s, '{}', now(), now(), 1, 'retry', %s)
        RETURNING id
        """,
        (group_id, partition, next(_offsets), key, 1 if claimed else None),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def flags(db: Conn) -> dict[int, bool]:
    return {r["id"]: r["head"] for r in db.execute("SELECT id, head FROM pgcg.parked")}


def stranded(db: Conn) -> list[dict[str, Any]]:
    """The first rows of keys that are not flagged (must be none)."""
    return [
        r
        for r in db.execute(
            "SELECT DISTINCT ON (group_id, partition, key) id, partition, key, head "
            "FROM pgcg.parked ORDER BY group_id, partition, key, id"
        )
        if not r["head"]
    ]


def waiting_for_a_lock(db: Conn, conn: Conn) -> bool:
    row = db.execute(
        "SELECT wait_event_type = 'Lock' AS waits FROM pg_stat_activity WHERE pid = %s",
        (conn.info.backend_pid,),
    ).fetchone()
    return bool(row and row["waits"])


def no_waiting(conn: Conn) -> None:
    """The next statements of this transaction fail at once rather than wait for a lock."""
    conn.execute("SET LOCAL lock_timeout = '500ms'")


# -- one transaction at a time ---------------------------------------------------------------


def test_a_key_gets_one_head_and_its_next_row_is_flagged_when_it_goes(
    db: Conn, group_id: int
) -> None:
    first, second, third = (park(db, group_id, "k") for _ in range(3))
    other = park(db, group_id, "k", partition=1)  # the same key in another partition
    assert flags(db) == {first: True, second: False, third: False, other: True}
    db.execute("DELETE FROM pgcg.parked WHERE id = %s", (second,))  # not the head
    assert flags(db) == {first: True, third: False, other: True}
    db.execute("DELETE FROM pgcg.parked WHERE id = %s", (first,))
    assert flags(db) == {third: True, other: True}


def test_a_batch_of_one_key_gets_one_head(db: Conn, group_id: int) -> None:
    """One INSERT of many rows (as a migration or a replay parks them)."""
    db.execute(
        """
        INSERT INTO pgcg.parked (group_id, partition, gen, "offset", tick, key, payload,
                                 enqueued_at, available_at, origin)
        SELECT %s, n %% 2, 0, n, 1, 'k' || (n %% 3), '{}', now(), now(), 'migrated'
        FROM generate_series(1, 60) AS n ORDER BY n
        """,
        (group_id,),
    )
    assert sum(flags(db).values()) == 6
    assert stranded(db) == []


def test_a_bulk_delete_leaves_every_remaining_key_flagged(db: Conn, group_id: int) -> None:
    """One statement deleting rows of many keys, heads and others (as a seek drops a
    partition's parked queue, or adopt buries what an earlier owner left)."""
    ids = {key: [park(db, group_id, key) for _ in range(4)] for key in ("a", "b", "c", "d")}
    gone = ids["a"][:2] + ids["b"][1:3] + ids["c"] + [ids["d"][0], ids["d"][2]]
    db.execute("DELETE FROM pgcg.parked WHERE id = ANY (%s)", (gone,))
    assert stranded(db) == []
    assert flags(db) == {ids["a"][2]: True, ids["a"][3]: False, ids["b"][0]: True,
                         ids["b"][3]: False, ids["d"][1]: True, ids["d"][3]: False}  # fmt: skip


def test_a_seek_empties_the_parked_queue_and_parking_starts_afresh(db: Conn, group_id: int) -> None:
    for key in ("a", "b"):
        for partition in (0, 1):
            park(db, group_id, key, partition=partition)
            park(db, group_id, key, partition=partition)
    db.execute("SELECT * FROM pgcg.seek_group(%s, 'latest')", (GROUP,))
    assert flags(db) == {}
    again = park(db, group_id, "a")
    assert flags(db) == {again: True}


# -- an insert and a delete of one key in two transactions -----------------------------------


@pytest.mark.parametrize("deleter_ends", ["commit", "rollback"])
def test_parking_behind_a_row_being_deleted_does_not_wait_and_is_flagged(
    db: Conn, group_id: int, connect: Callable[[], Conn], deleter_ends: str
) -> None:
    """A transactional handler completes the key's only parked message (its transaction
    deletes the row, then commits), while the writer parks the key's next message: the
    writer must not wait for the handler's transaction, and whichever way that ends, the
    new row is the key's head."""
    only = park(db, group_id, "k")
    handler, writer = connect(), connect()
    handler.execute("DELETE FROM pgcg.parked WHERE id = %s", (only,))
    no_waiting(writer)
    new = park(writer, group_id, "k")  # a lock wait here fails with LockNotAvailable
    writer.commit()
    getattr(handler, deleter_ends)()
    assert flags(db)[new] is True
    assert stranded(db) == []


def test_a_delete_waits_for_parking_behind_it_and_then_flags_the_new_row(
    db: Conn, group_id: int, connect: Callable[[], Conn]
) -> None:
    """The other order: the insert holds its lock on the key's last row first, so the
    delete of that row waits for the insert's commit, and then sees the new row."""
    only = park(db, group_id, "k")
    writer, deleter = connect(), connect()
    new = park(writer, group_id, "k")
    assert flags(writer)[new] is False  # the row before it is locked until this commits
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(
            lambda: deleter.execute("DELETE FROM pgcg.parked WHERE id = %s", (only,))
        )
        wait_for(lambda: waiting_for_a_lock(db, deleter), 10, "the delete to wait")
        writer.commit()
        deleting.result(timeout=10)
    deleter.commit()
    assert flags(db) == {new: True}


def test_parking_behind_a_claimed_row_flags_the_new_row(
    db: Conn, group_id: int, connect: Callable[[], Conn]
) -> None:
    """A claimed row is deleted by its result, maybe in a handler's own transaction at
    REPEATABLE READ, which cannot see a row committed after its snapshot: the row parked
    behind it is flagged when it is inserted."""
    running = park(db, group_id, "k", claimed=True)
    handler = connect()
    handler.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    handler.execute("SELECT count(*) FROM pgcg.parked")  # its snapshot, before the park
    new = park(db, group_id, "k")
    handler.execute("DELETE FROM pgcg.parked WHERE id = %s", (running,))
    handler.commit()
    assert flags(db) == {new: True}


# -- two deletes of one key in two transactions ----------------------------------------------


@pytest.mark.parametrize("later_ends", ["commit", "rollback"])
def test_deleting_the_head_while_the_next_row_is_being_deleted(
    db: Conn, group_id: int, connect: Callable[[], Conn], later_ends: str
) -> None:
    """The head's delete finds the next row being deleted by an open transaction: it waits
    for it (a row skipped instead would come back unflagged if that transaction rolled
    back), and flags whichever row is first then. The later delete waits for nothing."""
    head, second, third = (park(db, group_id, "k") for _ in range(3))
    first_tx, later_tx = connect(), connect()
    no_waiting(later_tx)
    later_tx.execute("DELETE FROM pgcg.parked WHERE id = %s", (second,))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(
            lambda: first_tx.execute("DELETE FROM pgcg.parked WHERE id = %s", (head,))
        )
        wait_for(lambda: waiting_for_a_lock(db, first_tx), 10, "the head's delete to wait")
        getattr(later_tx, later_ends)()
        deleting.result(timeout=10)
    first_tx.commit()
    expected = {third: True} if later_ends == "commit" else {second: True, third: False}
    assert flags(db) == expected


def test_deleting_the_next_row_after_the_head_went(
    db: Conn, group_id: int, connect: Callable[[], Conn]
) -> None:
    """The head's delete flagged the next row first: the delete of that row waits for it,
    then passes the flag on."""
    head, second, third = (park(db, group_id, "k") for _ in range(3))
    first_tx, later_tx = connect(), connect()
    first_tx.execute("DELETE FROM pgcg.parked WHERE id = %s", (head,))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(
            lambda: later_tx.execute("DELETE FROM pgcg.parked WHERE id = %s", (second,))
        )
        wait_for(lambda: waiting_for_a_lock(db, later_tx), 10, "the second delete to wait")
        first_tx.commit()
        deleting.result(timeout=10)
    later_tx.commit()
    assert flags(db) == {third: True}


def test_claims_and_retries_do_not_wait_for_parking_behind_them(
    db: Conn, group_id: int, connect: Callable[[], Conn]
) -> None:
    """The lock a new row holds on the row before it (FOR KEY SHARE) lets the writer
    claim, report progress on and retry that row: those change no key column."""
    tail = park(db, group_id, "k")
    writer, other = connect(), connect()
    park(writer, group_id, "k")
    no_waiting(other)
    other.execute(
        "UPDATE pgcg.parked SET claimed_epoch = 2, claim_token = 't', attempts = attempts + 1, "
        "locked_until = now(), progress = '{}', available_at = now(), last_error = 'x' "
        "WHERE id = %s",
        (tail,),
    )
    other.commit()
    writer.commit()


def test_the_migration_flags_the_first_row_of_each_key(empty_dsn: str) -> None:
    """Parked messages a version 5 schema holds get their flags when version 6 comes."""
    with psycopg.connect(empty_dsn, row_factory=dict_row) as conn, conn.transaction():
        conn.execute(MIGRATE.lock, {"lock": MIGRATION_LOCK})
        conn.execute(MIGRATE.create_version_table)
        for m in migrations():
            if m.version <= 5:
                conn.execute(m.sql)
                conn.execute(MIGRATE.record, {"version": m.version, "name": m.name})
    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
        conn.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
        conn.execute(
            """
            INSERT INTO pgcg.parked (group_id, partition, gen, "offset", tick, key, payload,
                                     enqueued_at, available_at, origin)
            SELECT g.id, n % 2, 0, n, 1, 'k' || (n % 3), '{}', now(), now(), 'retry'
            FROM pgcg.groups AS g, generate_series(1, 30) AS n
            """
        )
    assert [m.version for m in migrate(empty_dsn)] == [m.version for m in migrations()][5:]
    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        assert sum(flags(conn).values()) == 6
        assert stranded(conn) == []
