"""A connection whose packets vanish (no reset, no answer) is noticed and replaced within
about the session timeout, and the member rejoins once the network is back."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest

from pgcg.bench.chaos.netproxy import NetProxy, ProxyHub
from pgcg.consumer.service import Consumer
from pgcg.coordinator.service import Coordinator
from pgcg.shared.db import connect, liveness
from tests.helpers import await_for, fast_settings, owners, running

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"
SESSION_TIMEOUT = 3.0


@pytest.fixture
def proxy(pg_server: str) -> Iterator[NetProxy]:
    params = psycopg.conninfo.conninfo_to_dict(pg_server)
    with ProxyHub() as hub:
        yield hub.proxy(str(params["host"]), int(params["port"]))


async def noop(message: Any) -> None:
    return None


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


def members(db: psycopg.Connection[Any]) -> set[str]:
    rows = db.execute(
        "SELECT member_id FROM pgcg.consumer_groups WHERE group_name = %s", (GROUP,)
    ).fetchall()
    return {r["member_id"] for r in rows}


@pytest.mark.parametrize("timeout", [3, 3.5, 4, 5, 6, 10, 30, 300])
def test_every_connection_probes_for_a_dead_peer_within_the_session_timeout(
    timeout: float,
) -> None:
    opts = liveness("host=db dbname=x", timeout)
    assert opts["keepalives"] == 1
    probing = opts["keepalives_idle"] + opts["keepalives_count"] * opts["keepalives_interval"]
    assert probing <= timeout
    assert opts["keepalives_count"] >= 1
    assert opts.get("tcp_user_timeout", 0) <= timeout * 1000
    # What the URL sets itself is kept.
    assert "keepalives_idle" not in liveness("host=db keepalives_idle=60", 10)


async def test_keepalives_are_set_on_the_connection(dsn: str) -> None:
    conn = await connect(dsn, session_timeout=6)
    try:
        params = conn.pgconn.info
        given = {p.keyword.decode(): (p.val or b"").decode() for p in params}
        assert given["keepalives"] == "1"
        if psycopg.pq.version() >= 120000:
            assert given["tcp_user_timeout"] == "6000"
    finally:
        await conn.close()


async def test_a_black_holed_member_notices_and_rejoins_after_the_network_heals(
    db: psycopg.Connection[Any], dsn: str, proxy: NetProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg")
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    cfg = fast_settings({}, {"session_timeout": SESSION_TIMEOUT, "drain_deadline": 3})
    coordinator = Coordinator(cfg, dsn=dsn)
    consumer = Consumer(cfg, group=GROUP, topic=TOPIC, handler=noop, dsn=proxy.dsn_for(dsn))
    async with anyio.create_task_group() as tg:
        tg.start_soon(coordinator.run_until_stopped)
        async with running(consumer):
            first = consumer.member_id
            await await_for(
                lambda: {m for m, _, _ in owners(db, GROUP).values()} == {first},
                30,
                "the member to own every partition",
            )
            # Packets dropped both ways, sockets left open: no reset ever arrives.
            proxy.stall(3600)
            await await_for(
                lambda: [
                    r for r in actions(caplog, "heartbeat_failed") if "no answer" in r.getMessage()
                ],
                SESSION_TIMEOUT * 10,
                "the member to give up on its silent heartbeat connection",
            )
            await await_for(
                lambda: not consumer.ctx.assignment.owned,
                SESSION_TIMEOUT * 10,
                "the member to stop acting on its partitions",
            )
            await await_for(
                lambda: first not in members(db),
                SESSION_TIMEOUT * 10,
                "the coordinator to expire the silent member",
            )
            proxy.heal()
            await await_for(
                lambda: consumer.member_id != first and consumer.member_id in members(db),
                60,
                "the member to rejoin",
            )
            await await_for(
                lambda: {m for m, _, _ in owners(db, GROUP).values()} == {consumer.member_id},
                60,
                "the rejoined member to own every partition again",
            )
        await coordinator.stop()


async def test_a_black_holed_leader_notices_and_leads_again_after_the_network_heals(
    db: psycopg.Connection[Any], dsn: str, proxy: NetProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg")
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s, 'earliest')", (GROUP, TOPIC))
    cfg = fast_settings({}, {"leader_timeout": 3})
    coordinator = Coordinator(cfg, dsn=proxy.dsn_for(dsn))
    async with anyio.create_task_group() as tg:
        tg.start_soon(coordinator.run_until_stopped)
        await await_for(lambda: coordinator.elector.leading() == [GROUP], 30, "leadership")
        proxy.stall(3600)
        await await_for(
            lambda: actions(caplog, "leader_lost"),
            30,
            "the leader to give up on its silent connection",
        )
        proxy.heal()
        await await_for(lambda: coordinator.elector.leading() == [GROUP], 60, "leadership again")
        await coordinator.stop()
