"""Releasing revoked partitions against a real PostgreSQL, with the races a fault can open
forced by hand."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.service import Consumer
from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings
from tests.helpers import assign, owners

pytestmark = pytest.mark.anyio

GROUP, TOPIC = "g1", "orders"
COORD = Queries("coordinator")


async def noop(message: Any) -> None:
    return None


async def test_a_revocation_called_off_during_the_flush_is_not_released(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The release loop flushes acks before releasing what it found releasable. If the
    leader calls the revocation off meanwhile (the target left), the partition is ours
    again and working: releasing it from the stale list hands it to nobody while its
    new work is in flight, whose acks are then rejected (found by `pgcg chaos`, seed 44:
    duplicates after a revocation that had been called off)."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    consumer = Consumer(
        Settings(heartbeat_interval=0.5, session_timeout=3, drain_deadline=3),
        group=GROUP, topic=TOPIC, handler=noop, dsn=dsn,
    )  # fmt: skip
    ctx = consumer.ctx
    await ctx.membership.join()
    assign(db, GROUP, TOPIC, [0], ctx.member_id)
    ctx.assignment.apply(await ctx.membership.heartbeat() or [])
    params = {"group": GROUP, "topic": TOPIC, "partitions": [0], "drain_deadline_s": 0}
    db.execute(COORD.revoke, {**params, "targets": ["someone-else"]})
    ctx.assignment.apply(await ctx.membership.heartbeat() or [])  # revoking, deadline now
    owned = ctx.assignment.owned[0]
    assert owned.state == "revoking"

    async def flush() -> None:  # meanwhile, the leader calls the revocation off
        db.execute(COORD.unrevoke, params)
        ctx.assignment.apply(await ctx.membership.heartbeat() or [])

    consumer.acker.flush = flush  # type: ignore[method-assign]
    with anyio.move_on_after(1):
        await consumer._release_loop()
    assert owners(db, GROUP)[0] == (ctx.member_id, owned.epoch, "assigned")
    assert ctx.assignment.owned[0] is owned and owned.state == "assigned"
    await consumer._close()
