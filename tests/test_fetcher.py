"""The fetcher against a real PostgreSQL: what order claimed messages are handed out in."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for

pytestmark = pytest.mark.anyio

GROUP = "g-fetch"
TOPIC = "backlog"


async def test_backlogs_of_several_partitions_are_handled_oldest_first(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A member that takes over partitions with a backlog starts on all of them at once:
    one claim returns the backlogs partition by partition, and they are handed out oldest
    first across partitions, not one partition's whole backlog before the next."""
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    # Distinct keys, so nothing but the hand-out order decides what runs first.
    enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"k{i}", {"seq": i}) for i in range(200)])
    handled: list[Message] = []

    async def record(message: Message) -> None:
        handled.append(message)

    consumer = Consumer(
        Settings(heartbeat_interval=0.5, session_timeout=3, concurrency=1),
        group=GROUP,
        topic=TOPIC,
        handler=record,
        dsn=dsn,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assign(db, GROUP, TOPIC, [0, 1, 2, 3], consumer.member_id)
        await await_for(lambda: len(handled) == 200, 30, "the backlog handled")
        consumer.stop()
    ids = [m.id for m in handled]
    assert ids == sorted(ids)
    assert {m.partition for m in handled[:20]} == {0, 1, 2, 3}


async def test_payloads_and_headers_arrive_as_they_were_sent(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The consumer decodes jsonb itself (shared/db.py): text beyond ASCII, escapes and
    nesting come back equal to what the producer sent."""
    topic = "unicode"
    db.execute("SELECT pgcg.create_topic(%s, 2)", (topic,))
    sent = [
        OutgoingMessage("k1", {"text": "héllo wörld ✓ 😀 日本", "n": [1, 2.5, None, True]},
                        headers={"tenant": "zürich-😀", "note": 'quote " and \\ back'}),
        OutgoingMessage("k2", "a plain string \u00e9\u2028 with a line separator"),
        OutgoingMessage("k3", {"nested": {"deep": [{"x": "\t\n"}]}, "empty": {}}),
    ]  # fmt: skip
    enqueue_many_sync(db, topic, sent)
    handled: dict[str, Message] = {}

    async def record(message: Message) -> None:
        handled[message.key] = message

    consumer = Consumer(
        Settings(heartbeat_interval=0.5, session_timeout=3),
        group="g-unicode",
        topic=topic,
        handler=record,
        dsn=dsn,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assign(db, "g-unicode", topic, [0, 1], consumer.member_id)
        await await_for(lambda: len(handled) == 3, 30, "the three messages handled")
        consumer.stop()
    for message in sent:
        assert handled[message.key].payload == message.payload
        assert handled[message.key].headers == dict(message.headers)


async def test_an_application_json_loads_is_kept(
    db: psycopg.Connection[Any], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application that told psycopg how to decode JSON (floats as Decimal, say) gets
    its payloads decoded that way: pgcg's faster loader steps aside."""
    import decimal
    import functools
    import json

    from psycopg.types import json as psycopg_json

    from pgcg.shared.db import connect

    # What psycopg's set_json_loads(f) does globally, undone after the test.
    monkeypatch.setattr(
        psycopg_json._JsonLoader,
        "_loads",
        functools.partial(json.loads, parse_float=decimal.Decimal),
    )
    conn = await connect(dsn)
    async with conn:
        cur = await conn.execute("SELECT '{\"x\": 1.1}'::jsonb AS doc")
        row = await cur.fetchone()
    assert row is not None
    assert type(row["doc"]["x"]) is decimal.Decimal and row["doc"]["x"] == decimal.Decimal("1.1")
