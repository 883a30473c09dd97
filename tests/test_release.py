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
    """The release loop flushes results before releasing what it found releasable. If the
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
    # Due at once (the revoke waits at least the owner's session timeout).
    db.execute("UPDATE pgcg.partition_assignments SET revoke_deadline = now()")
    ctx.assignment.apply(await ctx.membership.heartbeat() or [])  # revoking, deadline now
    owned = ctx.assignment.owned[0]
    assert owned.state == "revoking"

    async def flush() -> None:  # meanwhile, the leader calls the revocation off
        db.execute(COORD.unrevoke, params)
        ctx.assignment.apply(await ctx.membership.heartbeat() or [])

    consumer.writer.flush = flush  # type: ignore[method-assign]
    with anyio.move_on_after(1):
        await consumer._release_loop()
    assert owners(db, GROUP)[0] == (ctx.member_id, owned.epoch, "assigned")
    assert ctx.assignment.owned[0] is owned and owned.state == "assigned"
    await consumer._close()


@pytest.mark.parametrize(("drain_deadline", "session_timeout", "due_in"), [
    (1, 10, 10),   # the owner's lease outlasts the leader's deadline: wait for the lease
    (20, 10, 20),  # the leader's deadline is the longer: it stands
])  # fmt: skip
async def test_a_forced_hand_off_waits_for_the_owners_lease(
    db: psycopg.Connection[Any], dsn: str, drain_deadline: int, session_timeout: int, due_in: int
) -> None:
    """Each process checks its own drain deadline against its own session timeout, but the
    leader's deadline meets the members' leases: a coordinator configured with a short
    deadline must still not force a hand-off while an owner that never heard of the
    revocation may be working."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    consumer = Consumer(
        Settings(heartbeat_interval=1, session_timeout=session_timeout,
                 drain_deadline=session_timeout),
        group=GROUP, topic=TOPIC, handler=noop, dsn=dsn,
    )  # fmt: skip
    await consumer.ctx.membership.join()
    assign(db, GROUP, TOPIC, [0], consumer.ctx.member_id)
    db.execute(
        COORD.revoke,
        {"group": GROUP, "topic": TOPIC, "partitions": [0], "targets": ["someone-else"],
         "drain_deadline_s": drain_deadline},
    )  # fmt: skip
    row = db.execute(
        "SELECT extract(epoch FROM revoke_deadline - now())::float8 AS s "
        "FROM pgcg.partition_assignments WHERE group_name = %s",
        (GROUP,),
    ).fetchone()
    assert row is not None and row["s"] == pytest.approx(due_in, abs=0.5)
    await consumer._close()
