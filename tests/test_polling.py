"""PGCG_LISTEN=false: a consumer that never LISTENs still sees new messages and assignment
changes, by polling (what it does behind a pooler without a session URL, and what the
latency bench compares NOTIFY with)."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.helpers import assign, await_for, fast_settings, running

pytestmark = [pytest.mark.anyio, pytest.mark.pg15]

GROUP, TOPIC = "g1", "orders"


async def test_without_listen_new_messages_and_assignments_arrive_by_polling(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg.consumer")
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    settings = fast_settings({}, {"listen": False, "poll_interval": 0.2})
    consumer = Consumer(settings, group=GROUP, topic=TOPIC, handler=handle, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)  # its NOTIFY goes unheard
        await await_for(lambda: len(consumer.ctx.assignment.owned) == 2, 10, "assignment seen")
        enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"k{i}", {"i": i}) for i in range(20)])
        await await_for(lambda: len(handled) == 20, 10, "every message handled")
        listeners = db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'pgcg-listener'"
        ).fetchone()
        assert listeners == {"n": 0}
    assert [r.message for r in caplog.records if getattr(r, "action", None) == "listen_off"]
