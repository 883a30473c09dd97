"""The coordinator's sweep in-process: expired members are acted on between full sweeps."""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
import pytest

from pgcg.coordinator.service import Coordinator
from pgcg.shared.settings import Settings
from tests.helpers import await_for

pytestmark = pytest.mark.anyio

GROUP = "g-sweep"
TOPIC = "sweep"


def members(db: psycopg.Connection[Any]) -> set[str]:
    rows = db.execute(
        "SELECT member_id FROM pgcg.consumer_groups WHERE group_name = %s", (GROUP,)
    ).fetchall()
    return {r["member_id"] for r in rows}


async def test_an_expired_member_is_expired_well_within_a_heartbeat_interval(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    # Full sweeps only every 5 s: anything faster is the expiry probe's doing.
    coord = Coordinator(Settings(heartbeat_interval=5, session_timeout=10), dsn=dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(coord.run_until_stopped)
        await await_for(lambda: coord.elector.leading() == [GROUP], 10, "leadership")
        await anyio.sleep(0.5)  # past the "leader elected" rebalance
        # A member whose last heartbeat is already older than its session timeout, joined
        # without a NOTIFY: only a sweep can find it.
        db.execute(
            "INSERT INTO pgcg.consumer_groups "
            "(group_name, member_id, host, pid, session_timeout_ms, last_heartbeat, protocol) "
            "VALUES (%s, 'silent', 'h', 1, 1000, now() - interval '1 minute', 3)",
            (GROUP,),
        )
        started = time.monotonic()
        await await_for(lambda: "silent" not in members(db), 10, "the silent member expired")
        took = time.monotonic() - started
        await coord.stop()
    assert took < 1.5, f"expired after {took:.2f}s"
    assert any("expiry probe" in o.reason for o in coord.outcomes)
