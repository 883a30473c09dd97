"""Adopting a partition again (consumer.sql `adopt`) against a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg

from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries
from tests.helpers import assign

Q = Queries("consumer")
GROUP, TOPIC, MEMBER = "g1", "orders", "host-1-abc"


def params(**extra: Any) -> dict[str, Any]:
    return {"group": GROUP, "topic": TOPIC, "member": MEMBER, **extra}


def claim(db: psycopg.Connection[Any], epoch: int) -> list[int]:
    rows = db.execute(
        Q.claim,
        params(partitions=[0], epochs=[epoch], limit=100, visibility_s=60, skip_keys=[]),
    ).fetchall()
    return sorted(r["id"] for r in rows)


def test_adopt_leaves_what_the_member_holds_claimed(db: psycopg.Connection[Any]) -> None:
    """After a claim whose answer may have been lost, adopt puts back only the rows the
    member does not hold: a row it holds must not be claimed again, or the claim's answer
    can race the row's ack and the acked message be handled a second time (found by
    `pgcg chaos`, seed 7)."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    ids = [e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {}) for _ in range(5)])]
    db.execute(Q.subscribe, params())
    db.execute(Q.ensure_assignment_rows, params(partitions=1))
    db.execute(Q.join, params(host="h", pid=1, session_timeout_ms=10_000))
    assign(db, GROUP, TOPIC, [0], MEMBER)
    (epoch,) = db.execute("SELECT epoch FROM pgcg.partition_assignments").fetchone().values()

    assert claim(db, epoch) == ids
    held = ids[:2]  # buffered or being handled; the rest were lost with the claim's answer
    adopted = db.execute(Q.adopt, params(partition=0, epoch=epoch, held=held))
    assert adopted.rowcount == 3
    assert claim(db, epoch) == ids[2:]
