"""An embedded consumer's lifecycle against a real PostgreSQL: stop() is safe before start,
twice, and after the end."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, fast_settings, unfinished

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"


def settings(**overrides: Any) -> Settings:
    return fast_settings({"drain_deadline": 2}, overrides)


def members(db: psycopg.Connection[Any]) -> int:
    row = db.execute(
        "SELECT count(*) AS n FROM pgcg.consumer_groups WHERE group_name = %s", (GROUP,)
    ).fetchone()
    assert row is not None
    return int(row["n"])


async def nothing(message: Message[Any]) -> None:
    pass


def setup(db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))


async def test_stop_before_run_makes_run_return_without_joining(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db)
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=nothing, dsn=dsn)
    consumer.stop()
    consumer.stop()
    await consumer.run(install_signal_handlers=False)
    assert consumer.stopped and not consumer.joined.is_set()
    assert members(db) == 0


async def test_stop_twice_drains_once_and_stop_after_the_end_does_nothing(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db)
    handled: list[int] = []

    async def handler(message: Message[Any]) -> None:
        handled.append(message.id)

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assert members(db) == 1
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        ids = [e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", 1)])]
        await await_for(lambda: handled == ids, what="handled")
        consumer.stop()
        consumer.stop()
    assert consumer.stopped
    assert members(db) == 0  # left the group once, cleanly
    assert unfinished(db, GROUP) == 0
    consumer.stop()
