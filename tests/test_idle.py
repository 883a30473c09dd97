"""An idle consumer whose LISTEN works polls only every SAFETY_POLL (consumer/reader.py):
a notification still brings a new message at once, and what waits in the parked queue (a
retry's backoff, a producer's delay parked with its key) is loaded when due, though
nothing notifies it. The deadlines below are generous and well under SAFETY_POLL: a
wake-up that depended on the safety poll would miss them."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgcg.consumer import reader
from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.helpers import assign, await_for, fast_settings, running

pytestmark = [pytest.mark.anyio, pytest.mark.pg15]

GROUP, TOPIC = "g1", "orders"
# Under SAFETY_POLL, with room for a loaded machine.
DEADLINE = reader.SAFETY_POLL / 3


def settings(**overrides: Any) -> Any:
    # A short poll_interval: the reader backs off to its quiet wait within a second.
    return fast_settings({"poll_interval": 0.2, "drain_deadline": 2}, overrides)


async def quiet(consumer: Consumer, at_least: float) -> None:
    """Wait until the reader waits `at_least` seconds for a notification."""
    await await_for(
        lambda: (consumer.reader.waiting or 0) >= at_least, 10, f"a quiet wait of {at_least}s"
    )


async def test_a_message_to_a_quiet_listening_consumer_is_handled_when_notified(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handle, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: len(consumer.ctx.assignment.owned) == 2, 10, "assignment seen")
        await quiet(consumer, reader.SAFETY_POLL)
        enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"n": 1})])
        await await_for(lambda: len(handled) == 1, DEADLINE, "the notified message handled")


async def test_a_retry_due_later_is_handled_when_due_without_a_notification(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    attempts: list[int] = []

    async def handle(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("not yet")

    consumer = Consumer(
        settings(), group=GROUP, topic=TOPIC, handler=handle, dsn=dsn, backoff=lambda _: 3.0
    )
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: len(consumer.ctx.assignment.owned) == 2, 10, "assignment seen")
        enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"n": 1})])
        await await_for(lambda: attempts == [1], 10, "the first attempt")
        # Parked for its retry, nothing in hand: the reader waits for a notification, but
        # only until the retry comes due.
        await quiet(consumer, 1.0)
        assert consumer.reader.waiting is not None
        assert consumer.reader.waiting < reader.SAFETY_POLL
        await await_for(lambda: attempts == [1, 2], DEADLINE, "the retry, once due")


async def test_a_delayed_message_parked_with_its_key_is_handled_when_due(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A producer's delay longer than park_after: read at once (the NOTIFY), parked with
    its key, and loaded from the parked queue when due."""
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    consumer = Consumer(settings(park_after=1), group=GROUP, topic=TOPIC, handler=handle, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: len(consumer.ctx.assignment.owned) == 2, 10, "assignment seen")
        await quiet(consumer, reader.SAFETY_POLL)
        enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"n": 1}, delay=4.0)])
        await await_for(
            lambda: db.execute("SELECT count(*) AS n FROM pgcg.parked").fetchone()["n"] == 1,
            10,
            "the delayed message parked",
        )
        await quiet(consumer, 1.0)
        assert handled == []
        await await_for(lambda: len(handled) == 1, DEADLINE, "the delayed message, once due")


async def test_a_quiet_consumer_notices_its_listener_lost_and_listens_again(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The listener waits on its socket, not on a query: a backend that goes away makes
    it reconnect (and catch up) all the same, and notifications work again after."""
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    def listener_pids() -> set[int]:
        rows = db.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'pgcg-listener'"
        ).fetchall()
        return {r["pid"] for r in rows}

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handle, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: len(consumer.ctx.assignment.owned) == 2, 10, "assignment seen")
        await quiet(consumer, reader.SAFETY_POLL)
        (old,) = listener_pids()
        db.execute("SELECT pg_terminate_backend(%s)", (old,))
        await await_for(lambda: listener_pids() - {old}, 10, "a new listener connection")
        await await_for(consumer.ctx.listening, 10, "listening again")
        await quiet(consumer, reader.SAFETY_POLL)
        enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"n": 1})])
        await await_for(lambda: len(handled) == 1, DEADLINE, "the notified message handled")
