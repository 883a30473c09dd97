"""The upgrade from the one-table storage to topics as retained logs, on real data: a
database built at the old schema with pending, retrying, delayed and dead-lettered
messages, migrated, then drained by a consumer. Nothing pending is lost, each message is
handled once, in key order, with its attempts kept; the dead letter keeps its group."""

from __future__ import annotations

import collections
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.migrate import MIGRATION_LOCK, migrate, migrations
from pgcg.shared.queries import Queries
from tests.helpers import assign, await_for, fast_settings, parked, running, unfinished

pytestmark = pytest.mark.anyio

Q = Queries("migrate")
TOPIC, GROUP = "orders", "billing"


def migrate_to(dsn: str, version: int) -> None:
    """The schema as an older pgcg left it: the migrations up to `version`, as `migrate`
    applies them."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn, conn.transaction():
        conn.execute(Q.lock, {"lock": MIGRATION_LOCK})
        conn.execute(Q.create_version_table)
        for m in migrations():
            if m.version <= version:
                conn.execute(m.sql)
                conn.execute(Q.record, {"version": m.version, "name": m.name})


def old_data(conn: psycopg.Connection[Any]) -> dict[str, list[int]]:
    """Five keys at the old schema: plain, one retrying (its first message failed twice),
    one delayed, one whose first message was dead-lettered, one with a message claimed by a
    member that then vanished. Returns each key's pending old ids in order."""
    conn.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    conn.execute(
        "INSERT INTO pgcg.subscriptions (group_name, topic) VALUES (%s, %s)", (GROUP, TOPIC)
    )
    conn.execute(
        "INSERT INTO pgcg.partition_assignments (group_name, topic, partition) "
        "SELECT %s, %s, p FROM generate_series(0, 3) AS p",
        (GROUP, TOPIC),
    )
    keys = ["plain", "retrying", "delayed", "after-dead", "claimed"]
    rows = conn.execute(
        "SELECT id FROM pgcg.enqueue(%s, %s, %s) ORDER BY ord",
        (
            TOPIC,
            [k for k in keys for _ in range(3)],
            [psycopg.types.json.Jsonb({"key": k, "n": n}) for k in keys for n in range(3)],
        ),
    ).fetchall()
    ids = collections.defaultdict(list)
    for (key, _), row in zip([(k, n) for k in keys for n in range(3)], rows, strict=True):
        ids[key].append(row["id"])
    conn.execute(
        "UPDATE pgcg.messages SET attempts = 2, last_error = 'boom', "
        "available_at = now() + interval '200 milliseconds' WHERE id = %s",
        (ids["retrying"][0],),
    )
    conn.execute(
        "UPDATE pgcg.messages SET available_at = now() + interval '1 second' WHERE id = %s",
        (ids["delayed"][0],),
    )
    conn.execute(
        "UPDATE pgcg.messages SET claimed_by = 'gone', claim_epoch = 1, "
        "locked_until = now() + interval '1 hour' WHERE id = %s",
        (ids["claimed"][0],),
    )
    dead = ids["after-dead"].pop(0)
    conn.execute(
        "INSERT INTO pgcg.dead_letters (message_id, topic, partition, key, payload, headers, "
        "enqueued_at, attempts, last_error) "
        "SELECT id, topic, partition, key, payload, headers, enqueued_at, 5, 'poison' "
        "FROM pgcg.messages WHERE id = %s",
        (dead,),
    )
    conn.execute("DELETE FROM pgcg.messages WHERE id = %s", (dead,))
    return ids


async def test_pending_messages_survive_the_upgrade_in_key_order(empty_dsn: str) -> None:
    migrate_to(empty_dsn, 2)
    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        ids = old_data(conn)
    assert [m.version for m in migrate(empty_dsn)] == [m.version for m in migrations()][2:]

    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as db:
        waiting = parked(db, GROUP)
        # The retrying and the delayed keys are parked from their first message on, attempts
        # kept; the others are plain log messages.
        by_key = collections.Counter(r["key"] for r in waiting)
        assert by_key == {"retrying": 3, "delayed": 3}
        assert {r["key"]: r["attempts"] for r in waiting if r["attempts"]} == {"retrying": 2}
        assert unfinished(db, GROUP) == 14
        (dl,) = db.execute("SELECT group_name, key, last_error FROM pgcg.dead_letters").fetchall()
        assert (dl["group_name"], dl["key"], dl["last_error"]) == (GROUP, "after-dead", "poison")

        seen: dict[str, list[int]] = collections.defaultdict(list)
        attempts: dict[tuple[str, int], int] = {}

        async def handler(message: Message) -> None:
            seen[message.key].append(message.payload["n"])
            attempts[(message.key, message.payload["n"])] = message.attempt

        consumer = Consumer(
            fast_settings({}, {"drain_deadline": 2}),
            group=GROUP,
            topic=TOPIC,
            handler=handler,
            dsn=empty_dsn,
        )
        async with running(consumer):
            assign(db, GROUP, TOPIC, [0, 1, 2, 3], consumer.member_id)
            await await_for(lambda: sum(map(len, seen.values())) >= 14, 60, "all 14 handled")
            await await_for(lambda: unfinished(db, GROUP) == 0, 30, "the group's work settled")
    assert dict(seen) == {
        "plain": [0, 1, 2],
        "retrying": [0, 1, 2],
        "delayed": [0, 1, 2],
        "after-dead": [1, 2],
        "claimed": [0, 1, 2],
    }, "a message lost, handled twice, or out of its key's order"
    assert attempts[("retrying", 0)] == 3, "the retries spent before the upgrade were forgotten"
    assert len(ids) == 5


def test_a_consumer_role_of_version_6_may_ask_for_its_next_parked_message(
    empty_dsn: str,
) -> None:
    """Version 7 adds next_parked, which a consumer calls when idle: a role `pgcg roles`
    made before (it may call load_parked) is granted it by the migration, or its consumers
    would fail after the upgrade until someone ran `pgcg roles` again."""
    migrate_to(empty_dsn, 6)
    role, other = (f"pgcg_v6_{uuid.uuid4().hex[:8]}" for _ in range(2))
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        try:
            for name in (role, other):
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL(
                    "GRANT EXECUTE ON FUNCTION pgcg.load_parked(text, integer[], bigint[], "
                    "bigint, integer, integer, text[], bigint[], integer[]) TO {}"
                ).format(sql.Identifier(role))
            )
            assert [m.version for m in migrate(empty_dsn)] == [m.version for m in migrations()][6:]
            may = (
                "SELECT has_function_privilege(%s, 'pgcg.next_parked(text, integer[])', 'EXECUTE')"
            )
            assert conn.execute(may, (role,)).fetchone() == (True,)
            assert conn.execute(may, (other,)).fetchone() == (False,)
            assert conn.execute(may, ("public",)).fetchone() == (False,)
        finally:
            for name in (role, other):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
