"""The fetcher against a real PostgreSQL, with the races a fault can open forced by hand."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings
from tests.helpers import assign

pytestmark = pytest.mark.anyio

GROUP, TOPIC = "g1", "orders"
Q = Queries("consumer")


async def noop(message: Any) -> None:
    return None


async def test_a_claim_answered_after_a_self_fence_waits_for_adopt(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A claim in flight when the lease runs out returns after the heartbeat gave the
    partition back under the same epoch. The rows the fence dropped are still claimed,
    so the claim took newer ones; taking those now would let them overtake the dropped
    ones. They must wait for the new incarnation's adopt (found by `pgcg chaos`: a stall
    just longer than the lease, shorter than the session)."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))

    def produce(n: int) -> list[int]:
        done = enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {}) for _ in range(n)])
        return [d.id for d in done]  # type: ignore[misc]

    consumer = Consumer(
        Settings(heartbeat_interval=0.5, session_timeout=3),
        group=GROUP, topic=TOPIC, handler=noop, dsn=dsn,
    )  # fmt: skip
    ctx, fetcher = consumer.ctx, consumer.fetcher
    await ctx.membership.join()
    assign(db, GROUP, TOPIC, [0], ctx.member_id)
    ctx.assignment.apply(await ctx.membership.heartbeat() or [])
    older = produce(2)
    await fetcher.fetch_once()
    assert ctx.scheduler.held(0) == older  # in memory, claimed under the epoch
    newer = produce(2)

    conn = await fetcher._connection()
    real_execute = conn.execute

    async def execute(query: Any, params: Any = None, **kw: Any) -> Any:
        cursor = await real_execute(query, params, **kw)
        if query is Q.claim:  # it claimed `newer`; meanwhile the lease ran out, and the
            ctx.assignment.lose_all("lease expired")  # fence dropped `older`; then the
            ctx.assignment.apply(await ctx.membership.heartbeat() or [])  # same epoch back
        return cursor

    conn.execute = execute  # type: ignore[method-assign]
    await fetcher.fetch_once()
    conn.execute = real_execute  # type: ignore[method-assign]
    assert ctx.scheduler.held(0) == []  # `newer` waits for the adopt

    await fetcher.fetch_once()  # adopts, then claims from the oldest again
    assert ctx.scheduler.held(0) == older + newer
    await consumer._close()
