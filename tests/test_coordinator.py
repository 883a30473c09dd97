"""Coordinator in-process: election, fenced writes, rebalancing with consumers."""

from __future__ import annotations

import collections
from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.service import Consumer
from pgcg.coordinator.service import Coordinator
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import await_for, fast_settings, owners

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"


DEFAULTS: dict[str, Any] = {"leader_timeout": 3, "drain_deadline": 2}


def settings(**overrides: Any) -> Settings:
    return fast_settings(DEFAULTS, overrides)


async def noop(message: Any) -> None:
    return None


def counts(db: psycopg.Connection[Any]) -> dict[str | None, int]:
    return dict(collections.Counter(m for m, _, s in owners(db, GROUP).values() if s != "x"))


async def test_three_consumers_balance_and_rebalance(db: psycopg.Connection[Any], dsn: str) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 16)", (TOPIC,))
    enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"k{i}", i) for i in range(200)])
    coord = Coordinator(settings(), dsn=dsn)
    consumers = [
        Consumer(settings(), group=GROUP, topic=TOPIC, handler=noop, dsn=dsn) for _ in range(3)
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(coord.run_until_stopped)
        for c in consumers:
            tg.start_soon(lambda c=c: c.run(install_signal_handlers=False))

        def balanced() -> bool:
            c = counts(db)
            return sorted(c.values()) == [5, 5, 6] and None not in c

        await await_for(balanced, 20, "16 partitions balanced 6/5/5")
        consumers[0].stop()
        await await_for(
            lambda: sorted(counts(db).values()) == [8, 8], 20, "8/8 after a graceful leave"
        )
        for c in consumers[1:]:
            c.stop()
        await coord.stop()
    reasons = [o.reason for o in coord.outcomes]
    assert reasons, "rebalances were recorded"


def test_a_notification_that_is_not_ours_is_ignored(dsn: str) -> None:
    """Any role that can connect may NOTIFY on the coordinator's channel: what does not
    look like pgcg's own event is dropped, and nothing raises in the listener."""
    coordinator = Coordinator(settings(), dsn=dsn)
    for payload in ["", "not json", "[1, 2]", '"text"', "{}",
                    '{"group": {"a": 1}, "event": "join"}', '{"group": ["g"], "event": "join"}',
                    '{"group": "g", "event": 7}']:  # fmt: skip
        coordinator._on_notify(payload)
    assert coordinator.dirty == {}
    coordinator._on_notify('{"group": "g", "event": "join", "member": {"x": 1}}')
    assert coordinator.dirty == {"g": "member join"}
