"""The consumer's data path against a real PostgreSQL: per-key FIFO, fencing, retries."""

from __future__ import annotations

import collections
from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, pending

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "heartbeat_interval": 0.5,
        "session_timeout": 3,
        "retry_base": 0.05,
        "retry_max": 0.2,
        "max_attempts": 3,
    }
    return Settings(**{**base, **overrides})


class Recorder:
    """Records handling; fails on purpose where asked; detects concurrent handling of a key."""

    def __init__(self, fail: dict[int, int] | None = None, delay: float = 0.0) -> None:
        self.handled: list[Message] = []
        self.active: collections.Counter[str] = collections.Counter()
        self.overlaps: list[str] = []
        self.fail = fail or {}  # message id -> failures before success
        self.delay = delay

    async def __call__(self, message: Message) -> None:
        self.active[message.key] += 1
        if self.active[message.key] > 1:
            self.overlaps.append(message.key)
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            if self.fail.get(message.id, 0) >= message.attempt:
                raise RuntimeError(f"boom {message.id} attempt {message.attempt}")
            self.handled.append(message)
        finally:
            self.active[message.key] -= 1


def setup_topic(db: psycopg.Connection[Any], partitions: int = 4) -> None:
    db.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, partitions))


def produce(db: psycopg.Connection[Any], n: int, keys: int) -> list[int]:
    msgs = [OutgoingMessage(f"k{i % keys}", {"seq": i}) for i in range(n)]
    return [e.id for e in enqueue_many_sync(db, TOPIC, msgs)]  # type: ignore[misc]


async def test_drains_in_key_order(db: psycopg.Connection[Any], dsn: str) -> None:
    setup_topic(db)
    ids = produce(db, 600, 30)
    recorder = Recorder(delay=0.001)
    consumer = Consumer(
        settings(concurrency=8), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assign(db, GROUP, TOPIC, [0, 1, 2, 3], consumer.member_id)
        await await_for(lambda: len(recorder.handled) == len(ids), 30, "all messages handled")
        consumer.stop()
    assert pending(db, TOPIC) == 0
    assert not recorder.overlaps
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for m in recorder.handled:
        by_key[m.key].append(m.payload["seq"])
    assert all(seqs == sorted(seqs) for seqs in by_key.values())
    assert sorted(m.id for m in recorder.handled) == sorted(ids)


async def test_a_retry_is_the_next_attempt_until_dead_lettered(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup_topic(db, partitions=1)
    recovers, fails = produce(db, 2, 2)
    recorder = Recorder(fail={recovers: 2, fails: 99})
    consumer = Consumer(
        settings(max_attempts=3), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: pending(db, TOPIC) == 0, 20, "handled or dead-lettered")
        consumer.stop()
    assert [(m.id, m.attempt) for m in recorder.handled] == [(recovers, 3)]
    dead = db.execute("SELECT message_id, attempts FROM pgcg.dead_letters").fetchall()
    assert dead == [{"message_id": fails, "attempts": 3}]
