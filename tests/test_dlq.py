"""Dead letters against a real PostgreSQL, per group: list with filters, replay to the
group's log only (keeping key order, bypassing dedup), purge needs a filter, and the
`pgcg dlq` commands."""

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
from pgcg.shared.errors import InvalidInput, InvalidName, UnknownGroup
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, running, unfinished
from tests.ops_helpers import dead_letter, fingerprint, one_line_error

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def letters(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """Dead letters of two groups, two topics and three keys, an hour apart: message ids
    1..7 (7: the same message as 1, dead-lettered by another group)."""
    for n, (group, topic, key) in enumerate(
        [("g1", "orders", "a"), ("g1", "orders", "b"), ("g3", "billing", "a"),
         ("g1", "orders", "a"), ("g1", "orders", "c"), ("g3", "billing", "b"),
         ("g2", "orders", "a")],
        start=1,
    ):  # fmt: skip
        dead_letter(db, group, topic, n * 1024, key, dead_at=T0 + timedelta(hours=n),
                    payload={"m": n})  # fmt: skip
    return db


def listed(db: psycopg.Connection[Any], **flt: Any) -> list[int]:
    return [r["message_id"] // 1024 for r in dlq.list_dead(db, dlq.Filter(**flt))]


def consumer_settings(**overrides: Any) -> Settings:
    return Settings(
        **{"heartbeat_interval": 0.5, "session_timeout": 3, "retry_base": 0.01,
           "retry_max": 0.02, "max_attempts": 2, "drain_deadline": 2, **overrides}
    )  # fmt: skip


async def test_list_filters(letters: psycopg.Connection[Any]) -> None:
    db = letters
    assert listed(db) == [1, 2, 3, 4, 5, 6, 7]
    assert listed(db, topic="orders") == [1, 2, 4, 5, 7]
    assert listed(db, key="a") == [1, 3, 4, 7]
    assert listed(db, topic="orders", key="a") == [1, 4, 7]
    assert listed(db, group="g1", key="a") == [1, 4]
    assert listed(db, group="g2") == [7]
    assert listed(db, group="nobody") == []
    # since is inclusive, until exclusive
    assert listed(db, since=T0 + timedelta(hours=2)) == [2, 3, 4, 5, 6, 7]
    assert listed(db, until=T0 + timedelta(hours=2)) == [1]
    assert listed(db, since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=4)) == [2, 3]
    assert listed(db, topic="billing", since=T0 + timedelta(hours=4)) == [6]
    assert listed(db, limit=2) == [1, 2]
    assert listed(db, key="nobody") == []
    row = dlq.list_dead(db, dlq.Filter(key="c"))[0]
    assert row["payload"] == {"m": 5}
    assert (row["attempts"], row["last_error"], row["group_name"]) == (3, "boom", "g1")
    assert (row["partition"], row["offset"], row["reason"]) == (0, 5, "boom")


async def test_filter_validation(letters: psycopg.Connection[Any]) -> None:
    with pytest.raises(InvalidInput, match="--since must be before --until"):
        listed(letters, since=T0, until=T0)
    with pytest.raises(InvalidInput, match="--limit"):
        listed(letters, limit=0)
    with pytest.raises(InvalidName):
        listed(letters, topic="Not A Topic")
    with pytest.raises(InvalidName):
        listed(letters, group="not a group")
    with pytest.raises(InvalidInput, match="replay needs --group"):
        dlq.replay(letters, dlq.Filter(topic="orders"))
    with pytest.raises(UnknownGroup, match="unknown group 'g3'"):
        dlq.replay(letters, dlq.Filter(group="g3"))  # dead letters of a deleted group


async def test_purge_needs_a_filter_or_all(letters: psycopg.Connection[Any]) -> None:
    db = letters
    with pytest.raises(InvalidInput, match="--all"):
        dlq.purge(db, dlq.Filter())
    assert len(listed(db)) == 7
    assert dlq.purge(db, dlq.Filter(group="g1", key="a")) == 2
    assert listed(db) == [2, 3, 5, 6, 7]
    assert dlq.purge(db, dlq.Filter(until=T0 + timedelta(hours=3))) == 1
    assert listed(db) == [3, 5, 6, 7]
    assert dlq.purge(db, dlq.Filter(group="g2")) == 1
    assert dlq.purge(db, dlq.Filter(), everything=True) == 3
    assert listed(db) == []


class Handler:
    """Records handlings; fails every delivery of the messages in `broken` while set."""

    def __init__(self, *broken: int) -> None:
        self.broken = set(broken)
        self.handled: list[Message] = []
        self.gate: dict[int, anyio.Event] = {}

    async def __call__(self, message: Message) -> None:
        if message.id in self.broken:
            raise RuntimeError("downstream is down")
        if message.id in self.gate:
            await self.gate[message.id].wait()
        self.handled.append(message)

    def ids(self) -> list[int]:
        return [m.id for m in self.handled]


def log_row(db: psycopg.Connection[Any], message_id: int) -> dict[str, Any]:
    row = db.execute(
        "SELECT l.key, l.payload, l.headers, l.dedup_key, g.group_name AS only_group "
        "FROM pgcg.log AS l LEFT JOIN pgcg.groups AS g ON g.id = l.only_group "
        'WHERE l.partition = %s AND l."offset" = %s',
        (message_id % 1024, message_id // 1024),
    ).fetchone()
    assert row is not None
    return dict(row)


async def replay_cli(cli: Any, dsn: str, *args: str) -> Any:
    """`pgcg dlq replay` from a thread: the consumers in this event loop keep running."""
    return await anyio.to_thread.run_sync(lambda: cli(dsn, "dlq", "replay", *args))


async def test_replay_reaches_only_its_group(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    """Two groups read one topic; billing dead-letters a message that audit handled. The
    replay is for billing only: audit reads past it without handling it again."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    for group in ("billing", "audit"):
        db.execute("SELECT pgcg.create_group(%s, %s)", (group, TOPIC))
    (poison,) = [
        e.id
        for e in enqueue_many_sync(
            db, TOPIC, [OutgoingMessage("k", "first", {"h": "v"}, dedup_key="order-1")]
        )
    ]
    billing, audit = Handler(poison), Handler()
    b = Consumer(consumer_settings(), group="billing", topic=TOPIC, handler=billing, dsn=dsn)
    a = Consumer(consumer_settings(), group="audit", topic=TOPIC, handler=audit, dsn=dsn)
    async with running(b, a):
        assign(db, "billing", TOPIC, [0], b.member_id)
        assign(db, "audit", TOPIC, [0], a.member_id)
        await await_for(lambda: listed(db, group="billing") == [poison // 1024], what="dead")
        await await_for(lambda: audit.ids() == [poison], what="audit handled it")
        assert listed(db, group="audit") == []

        billing.broken.clear()  # the operator fixed what billing calls
        done = await replay_cli(cli, dsn, "--group", "billing")
        assert done.exit_code == 0, done.output
        out = json.loads(done.stdout)
        (new_id,) = out["ids"]
        assert (out["replayed"], out["from"]) == (1, [poison]) and new_id != poison
        # A new message, for billing only, with its headers and its dedup key: the dedup
        # window (5 minutes) would have swallowed it as a producer's retry.
        row = log_row(db, new_id)
        # (headers: plus the trace context when another test installed a tracer)
        assert row["headers"]["h"] == "v"
        assert {k: row[k] for k in ("key", "payload", "dedup_key", "only_group")} == {
            "key": "k", "payload": "first", "dedup_key": "order-1", "only_group": "billing",
        }  # fmt: skip
        await await_for(lambda: billing.ids() == [new_id], what="billing handled the replay")
        assert billing.handled[0].attempt == 1
        (marker,) = [e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", "m")])]
        await await_for(lambda: audit.ids() == [poison, marker], what="audit read past it")
        await await_for(lambda: billing.ids() == [new_id, marker], what="billing went on")
        await await_for(lambda: unfinished(db, "audit") + unfinished(db, "billing") == 0,
                        what="both groups' results written")  # fmt: skip
    assert listed(db) == []


async def test_replay_comes_after_the_messages_of_its_key_already_enqueued(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    """Replayed while the consumer already holds newer messages of the key in memory, one of
    them running: it is handled after them (it is a new message at the end of the log)."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    first, *newer = [
        e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", n) for n in range(3)])
    ]
    handler = Handler(first)
    handler.gate[newer[0]] = anyio.Event()
    consumer = Consumer(consumer_settings(max_attempts=1), group=GROUP, topic=TOPIC,
                        handler=handler, dsn=dsn)  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: consumer.ctx.scheduler.busy() == 1, what="newer[0] in flight")
        await await_for(lambda: listed(db) == [first // 1024], what="first dead-lettered")
        handler.broken.clear()
        done = await replay_cli(cli, dsn, "--group", GROUP, "--key", "k")
        (replayed,) = json.loads(done.stdout)["ids"]
        (after,) = [e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", 9)])]
        handler.gate[newer[0]].set()
        await await_for(lambda: len(handler.handled) == 4, what="all handled")
    assert handler.ids() == [*newer, replayed, after]
    assert [m.payload for m in handler.handled] == [1, 2, 0, 9]


# -- pgcg dlq --------------------------------------------------------------------------------


async def test_cli_dlq_list_json(letters: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    done = cli(dsn, "dlq", "list", "--json", "--group", "g1", "--key", "a")
    assert done.exit_code == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["message_id"] for r in rows] == [1024, 4096]
    assert rows[0]["payload"] == {"m": 1}
    assert (rows[0]["key"], rows[0]["topic"], rows[0]["group_name"]) == ("a", "orders", "g1")
    assert datetime.fromisoformat(rows[0]["dead_at"]) == T0 + timedelta(hours=1)

    since = cli(dsn, "dlq", "list", "--json", "--since", "2026-03-01 16:00:00")
    assert [json.loads(line)["message_id"] // 1024 for line in since.stdout.splitlines()] == [
        4, 5, 6, 7,
    ]  # fmt: skip

    table = cli(dsn, "dlq", "list", "--key", "c")
    assert table.exit_code == 0
    assert table.stdout.split("\t")[:5] == ["5120", "g1", "orders", "c", "3"]


async def test_cli_dlq_purge_and_replay(
    letters: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    refused = cli(dsn, "dlq", "purge")
    assert "--all" in one_line_error(refused)
    assert len(listed(letters)) == 7

    letters.execute("SELECT pgcg.create_topic('orders', 1)")
    letters.execute("SELECT pgcg.create_group('g1', 'orders')")
    letters.execute("SELECT pgcg.create_group('g2', 'orders')")
    before = fingerprint(letters)
    assert "replay needs --group" in one_line_error(cli(dsn, "dlq", "replay", "--key", "a"))
    assert "invalid group name" in one_line_error(cli(dsn, "dlq", "replay", "--group", "a b"))
    unknown = one_line_error(cli(dsn, "dlq", "replay", "--group", "nope"), code=3)
    assert "unknown group 'nope'" in unknown
    assert fingerprint(letters) == before

    replayed = cli(dsn, "dlq", "replay", "--group", "g1", "--key", "a")
    out = json.loads(replayed.stdout)
    assert (out["replayed"], out["from"]) == (2, [1024, 4096])
    rows = letters.execute(
        'SELECT l."offset" * 1024 + l.partition AS id, l.payload, g.group_name '
        'FROM pgcg.log AS l JOIN pgcg.groups AS g ON g.id = l.only_group ORDER BY l."offset"'
    ).fetchall()
    assert [(r["id"], r["payload"], r["group_name"]) for r in rows] == [
        (out["ids"][0], {"m": 1}, "g1"),
        (out["ids"][1], {"m": 4}, "g1"),
    ]
    assert listed(letters, key="a") == [3, 7]  # g3's and g2's stay

    purged = cli(dsn, "dlq", "purge", "--topic", "billing")
    assert json.loads(purged.stdout) == {"purged": 2}
    only = cli(dsn, "dlq", "purge", "--group", "g2")
    assert json.loads(only.stdout) == {"purged": 1}
    everything = cli(dsn, "dlq", "purge", "--all")
    assert json.loads(everything.stdout) == {"purged": 2}
    assert listed(letters) == []
