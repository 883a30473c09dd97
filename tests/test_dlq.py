"""Dead letters against a real PostgreSQL: list with filters, replay keeps key order, purge
needs a filter, and the `pgcg dlq` commands."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared import dlq
from pgcg.shared.errors import InvalidInput, InvalidName
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, pending, running

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def dead_letter(
    db: psycopg.Connection[Any], message_id: int, topic: str, key: str, dead_at: datetime
) -> None:
    db.execute(
        "INSERT INTO pgcg.dead_letters (message_id, topic, partition, key, payload, headers, "
        "enqueued_at, attempts, last_error, dead_at) "
        "VALUES (%s, %s, 0, %s, %s, '{}', %s, 3, 'boom', %s)",
        (message_id, topic, key, json.dumps({"m": message_id}), dead_at, dead_at),
    )


@pytest.fixture
def letters(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """Dead letters of two topics and three keys, an hour apart: message ids 1..6."""
    for n, (topic, key) in enumerate(
        [("orders", "a"), ("orders", "b"), ("billing", "a"), ("orders", "a"), ("orders", "c"),
         ("billing", "b")],
        start=1,
    ):  # fmt: skip
        dead_letter(db, n, topic, key, T0 + timedelta(hours=n))
    return db


def listed(db: psycopg.Connection[Any], **flt: Any) -> list[int]:
    return [r["message_id"] for r in dlq.list_dead(db, dlq.Filter(**flt))]


async def test_list_filters(letters: psycopg.Connection[Any]) -> None:
    db = letters
    assert listed(db) == [1, 2, 3, 4, 5, 6]
    assert listed(db, topic="orders") == [1, 2, 4, 5]
    assert listed(db, key="a") == [1, 3, 4]
    assert listed(db, topic="orders", key="a") == [1, 4]
    # since is inclusive, until exclusive
    assert listed(db, since=T0 + timedelta(hours=2)) == [2, 3, 4, 5, 6]
    assert listed(db, until=T0 + timedelta(hours=2)) == [1]
    assert listed(db, since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=4)) == [2, 3]
    assert listed(db, topic="billing", since=T0 + timedelta(hours=4)) == [6]
    assert listed(db, limit=2) == [1, 2]
    assert listed(db, key="nobody") == []
    row = dlq.list_dead(db, dlq.Filter(key="c"))[0]
    assert row["payload"] == {"m": 5}
    assert (row["attempts"], row["last_error"]) == (3, "boom")


async def test_filter_validation(letters: psycopg.Connection[Any]) -> None:
    with pytest.raises(InvalidInput, match="--since must be before --until"):
        listed(letters, since=T0, until=T0)
    with pytest.raises(InvalidInput, match="--limit"):
        listed(letters, limit=0)
    with pytest.raises(InvalidName):
        listed(letters, topic="Not A Topic")


async def test_purge_needs_a_filter_or_all(letters: psycopg.Connection[Any]) -> None:
    db = letters
    with pytest.raises(InvalidInput, match="--all"):
        dlq.purge(db, dlq.Filter())
    assert len(listed(db)) == 6
    assert dlq.purge(db, dlq.Filter(topic="orders", key="a")) == 2
    assert listed(db) == [2, 3, 5, 6]
    assert dlq.purge(db, dlq.Filter(until=T0 + timedelta(hours=3))) == 1
    assert listed(db) == [3, 5, 6]
    assert dlq.purge(db, dlq.Filter(), everything=True) == 3
    assert listed(db) == []


async def test_replayed_message_is_handled_before_newer_messages_of_its_key(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    (poison,) = [e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", "first")])]
    handled: list[tuple[int, Any, int]] = []
    broken = True

    async def handler(message: Message) -> None:
        if broken and message.id == poison:
            raise RuntimeError("downstream is down")
        handled.append((message.id, message.payload, message.attempt))

    def consumer() -> Consumer:
        settings = Settings(
            heartbeat_interval=0.5, session_timeout=3, retry_base=0.01, retry_max=0.02,
            max_attempts=2, drain_deadline=2,
        )  # fmt: skip
        return Consumer(settings, group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)

    first = consumer()
    async with running(first):
        assign(db, GROUP, TOPIC, [0, 1], first.member_id)
        await await_for(lambda: listed(db) == [poison], what="the poison dead-lettered")
    assert handled == []

    # Newer messages of the same key wait while nobody consumes; then the operator fixes
    # the downstream and replays.
    newer = [
        e.id
        for e in enqueue_many_sync(
            db, TOPIC, [OutgoingMessage("k", "second"), OutgoingMessage("k", "third")]
        )
    ]
    broken = False
    (replayed,) = dlq.replay(db, dlq.Filter(key="k"))
    assert replayed["id"] == poison
    assert listed(db) == []
    rows = db.execute(
        "SELECT id, payload, attempts, claimed_by FROM pgcg.messages WHERE key = 'k' ORDER BY id"
    ).fetchall()
    assert [r["id"] for r in rows] == [poison, *newer]
    assert rows[0] == {"id": poison, "payload": "first", "attempts": 0, "claimed_by": None}

    second = consumer()
    async with running(second):
        assign(db, GROUP, TOPIC, [0, 1], second.member_id)
        await await_for(lambda: len(handled) == 3, what="the key drained")
    assert handled == [(poison, "first", 1), (newer[0], "second", 1), (newer[1], "third", 1)]
    assert pending(db, TOPIC) == 0


async def test_replay_into_a_live_consumer_keeps_order(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Replayed while the consumer already holds newer messages of the key in memory."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    first, *newer = [
        e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", n) for n in range(3)])
    ]
    # the first one dead-lettered earlier, by hand, as an operator's tool would find it
    db.execute(
        "WITH gone AS (DELETE FROM pgcg.messages WHERE id = %s RETURNING *) "
        "INSERT INTO pgcg.dead_letters (message_id, topic, partition, key, payload, headers, "
        "enqueued_at, attempts, last_error) "
        "SELECT id, topic, partition, key, payload, headers, enqueued_at, 3, 'boom' FROM gone",
        (first,),
    )
    gate = anyio.Event()
    handled: list[int] = []

    async def handler(message: Message) -> None:
        if message.id == newer[0]:
            await gate.wait()
        handled.append(message.id)

    settings = Settings(heartbeat_interval=0.5, session_timeout=3, drain_deadline=2)
    consumer = Consumer(settings, group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: consumer.ctx.scheduler.busy() == 1, what="newer[0] in flight")
        dlq.replay(db, dlq.Filter(topic=TOPIC))
        await await_for(lambda: consumer.ctx.scheduler.buffered() == 3, what="replay claimed")
        gate.set()
        await await_for(lambda: len(handled) == 3, what="all handled")
    # newer[0] was already being handled; the replayed message goes right after it,
    # before everything newer that was still waiting
    assert handled == [newer[0], first, newer[1]]


# -- pgcg dlq --------------------------------------------------------------------------------


async def test_cli_dlq_list_json(letters: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    done = cli(dsn, "dlq", "list", "--json", "--topic", "orders", "--key", "a")
    assert done.exit_code == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["message_id"] for r in rows] == [1, 4]
    assert rows[0]["payload"] == {"m": 1}
    assert rows[0]["key"] == "a" and rows[0]["topic"] == "orders"
    assert datetime.fromisoformat(rows[0]["dead_at"]) == T0 + timedelta(hours=1)

    since = cli(dsn, "dlq", "list", "--json", "--since", "2026-03-01 16:00:00")
    assert [json.loads(line)["message_id"] for line in since.stdout.splitlines()] == [4, 5, 6]

    table = cli(dsn, "dlq", "list", "--key", "c")
    assert table.exit_code == 0
    assert table.stdout.split("\t")[:4] == ["5", "orders", "c", "3"]


async def test_cli_dlq_purge_and_replay(
    letters: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    refused = cli(dsn, "dlq", "purge")
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "--all" in refused.stderr
    assert len(listed(letters)) == 6

    letters.execute("SELECT pgcg.create_topic('orders', 1)")
    replayed = cli(dsn, "dlq", "replay", "--topic", "orders", "--key", "c")
    assert json.loads(replayed.stdout) == {"replayed": 1}
    assert [r["id"] for r in letters.execute("SELECT id FROM pgcg.messages")] == [5]

    purged = cli(dsn, "dlq", "purge", "--topic", "billing")
    assert json.loads(purged.stdout) == {"purged": 2}
    everything = cli(dsn, "dlq", "purge", "--all")
    assert json.loads(everything.stdout) == {"purged": 3}
    assert listed(letters) == []
