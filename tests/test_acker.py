"""The acker against a real PostgreSQL, with the races a fault can open forced by hand."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from pgcg.consumer.acker import Result
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign

pytestmark = pytest.mark.anyio

GROUP, TOPIC = "g1", "orders"


async def noop(message: Any) -> None:
    return None


async def test_a_row_acked_already_under_our_epoch_settles(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """After a self-fence the partition comes back under the same epoch, and a result
    handled before the fence can still be on its way: its ack deletes the row while the
    message, claimed again, is handled once more. That second ack finds no row although
    the partition is still ours at this epoch; only our own ack can have deleted it, so
    it is settled, not taken for a lost partition (which cancelled the partition's
    in-flight work and caused more duplicates; found by `pgcg chaos`, seed 2026)."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {})])
    consumer = Consumer(
        Settings(heartbeat_interval=0.5, session_timeout=3),
        group=GROUP, topic=TOPIC, handler=noop, dsn=dsn,
    )  # fmt: skip
    ctx = consumer.ctx
    await ctx.membership.join()
    assign(db, GROUP, TOPIC, [0], ctx.member_id)
    ctx.assignment.apply(await ctx.membership.heartbeat() or [])
    await consumer.fetcher.fetch_once()
    (item,) = ctx.scheduler.take(time.monotonic(), 10)
    db.execute("DELETE FROM pgcg.messages WHERE id = %s", (item.id,))  # the earlier ack

    consumer.acker.submit(Result(item))
    await consumer.acker.flush()
    assert ctx.assignment.current(0, item.epoch) is not None  # still ours
    assert ctx.scheduler.held(0) == []  # and the key moved on
    await consumer._close()
