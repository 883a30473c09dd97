"""Metrics read with an in-memory reader (and as Prometheus text), and the HTTP endpoint
the Kubernetes probes and Prometheus use, against a real database."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest
from prometheus_client import generate_latest

from pgcg.consumer.message import Message
from pgcg.consumer.observer import ConsumerObserver
from pgcg.consumer.service import Consumer
from pgcg.coordinator.observer import CoordinatorObserver
from pgcg.coordinator.rebalancer import reason_kind
from pgcg.coordinator.service import Coordinator
from pgcg.shared.health import HealthServer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, fast_settings, pending
from tests.otel import Otel, install

pytestmark = pytest.mark.anyio

TOPIC = "orders"
GROUP_ATTR = "messaging.consumer.group.name"


@pytest.fixture
def otel() -> Otel:
    return install()


DEFAULTS: dict[str, Any] = {
    "leader_timeout": 3,
    "drain_deadline": 2,
    "retry_base": 0.02,
    "retry_max": 0.05,
    "max_attempts": 3,
}


def settings(**overrides: Any) -> Settings:
    return fast_settings(DEFAULTS, overrides)


class Gated:
    """Holds every handler call until opened; fails the messages named in `fail` for that
    many attempts."""

    def __init__(self, fail: dict[int, int]) -> None:
        self.gate = anyio.Event()
        self.fail = fail
        self.calls = 0

    async def __call__(self, message: Message) -> None:
        await self.gate.wait()
        self.calls += 1
        if self.fail.get(message.id, 0) >= message.attempt:
            raise RuntimeError(f"boom {message.id}")


async def get(url: str) -> tuple[int, str, str]:
    def fetch() -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    return await anyio.to_thread.run_sync(fetch)


async def test_consumer_metrics_and_endpoint(
    db: psycopg.Connection[Any], dsn: str, otel: Otel
) -> None:
    group = "metered"
    mine = {GROUP_ATTR: group}
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    messages = [OutgoingMessage(f"k{i % 10}", {"n": i}) for i in range(20)]
    sent = enqueue_many_sync(db, TOPIC, messages)
    always, once = sent[0].id, sent[1].id
    assert always is not None and once is not None
    handler = Gated(fail={always: 99, once: 1})
    consumer = Consumer(settings(), group=group, topic=TOPIC, handler=handler, dsn=dsn)
    observer = ConsumerObserver(consumer, lag_interval=60)
    server = HealthServer(0, ready=observer.ready, registry=otel.registry, host="127.0.0.1")
    with server:
        base = f"http://127.0.0.1:{server.port}"
        assert (await get(f"{base}/healthz"))[0] == 200
        status, _, body = await get(f"{base}/readyz")
        assert (status, body) == (503, f"not ready: not yet joined group {group}\n")
        assert (await get(f"{base}/nope"))[0] == 404

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            # Joined, but the group's partitions are not its yet: not ready.
            await observer.assignment_check.refresh(consumer.member_id)
            status, _, body = await get(f"{base}/readyz")
            assert status == 503 and "holds 0 of at least 4 partitions" in body

            assign(db, group, TOPIC, [0, 1, 2, 3], consumer.member_id)
            await await_for(lambda: len(consumer.ctx.assignment.owned) == 4, 10, "4 partitions")
            await observer.assignment_check.refresh(consumer.member_id)
            status, _, body = await get(f"{base}/readyz")
            assert status == 200 and consumer.member_id in body
            await observer.refresh()
            assert otel.total("pgcg.consumer.lag", **mine) == 20
            lag_points = otel.points("pgcg.consumer.lag", **mine)
            partitions = [p.attributes["messaging.destination.partition.id"] for p in lag_points]
            assert sorted(partitions) == ["0", "1", "2", "3"]
            assert all(p.attributes["messaging.destination.name"] == TOPIC for p in lag_points)
            ages = otel.points("pgcg.consumer.lag.age", **mine)
            assert ages and all(p.value >= 0 for p in ages)
            assert max(p.value for p in ages) > 0
            assert otel.total("pgcg.consumer.partitions", **mine, **{"pgcg.state": "assigned"}) == 4
            (heartbeat,) = otel.points("pgcg.consumer.heartbeat.age", **mine)
            assert 0 <= heartbeat.value < 3
            await await_for(
                lambda: otel.total("pgcg.consumer.in_flight", **mine) > 0, 10, "handlers waiting"
            )

            status, content_type, text = await get(f"{base}/metrics")
            assert status == 200 and content_type.startswith("text/plain")
            assert f'pgcg_consumer_lag{{messaging_consumer_group_name="{group}"' in text
            assert "pgcg_consumer_heartbeat_age_seconds" in text

            handler.gate.set()
            await await_for(lambda: pending(db, TOPIC) == 0, 20, "queue drained")
            await await_for(
                lambda: otel.total("pgcg.messages.processed", **mine) == 19, 5, "19 acked"
            )
            consumer.stop()
        status, _, body = await get(f"{base}/readyz")
        assert (status, body) == (503, "not ready: draining for shutdown\n")

    # 18 messages once, `once` twice, `always` max_attempts times.
    assert handler.calls == 18 + 2 + 3
    assert otel.total("pgcg.messages.retried", **mine) == 1 + 2
    assert otel.total("pgcg.messages.dead_lettered", **mine) == 1
    durations = otel.points("messaging.process.duration", **mine)
    ok = [p for p in durations if "error.type" not in p.attributes]
    failed = [p for p in durations if p.attributes.get("error.type") == "RuntimeError"]
    assert sum(p.count for p in ok) == 19 and sum(p.count for p in failed) == 4
    assert all(p.attributes["messaging.system"] == "pgcg" for p in durations)
    exposition = generate_latest(otel.registry).decode()
    assert "messaging_process_duration_seconds_bucket" in exposition
    dead = f'pgcg_messages_dead_lettered_total{{messaging_consumer_group_name="{group}"'
    assert dead in exposition
    observer.close()
    assert otel.points("pgcg.consumer.lag", **mine) == [], "a closed observer reports nothing"


async def test_coordinator_metrics_and_readiness(
    db: psycopg.Connection[Any], dsn: str, otel: Otel
) -> None:
    group = "led"
    mine = {GROUP_ATTR: group}
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"k{i}", {"n": i}) for i in range(10)])
    handler = Gated(fail={})
    coordinator = Coordinator(settings(), dsn=dsn)
    observer = CoordinatorObserver(coordinator, lag_interval=60)
    consumer = Consumer(settings(), group=group, topic=TOPIC, handler=handler, dsn=dsn)
    assert observer.ready() == (False, "first election round not done yet")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            tg.start_soon(coordinator.run_until_stopped)
            await await_for(lambda: len(consumer.ctx.assignment.owned) == 4, 20, "assigned")
            ready, detail = observer.ready()
            assert ready and detail == "leader of ['led'], standby for no group"
            (leader,) = otel.points("pgcg.coordinator.leader", **mine)
            assert leader.value == 1
            assert leader.attributes["messaging.destination.name"] == TOPIC

            await observer.refresh()
            lag = otel.points("pgcg.group.lag", **mine)
            assert len(lag) == 4, "every partition, also those with nothing waiting"
            assert sum(p.value for p in lag) == 10
            handler.gate.set()
            await await_for(lambda: pending(db, TOPIC) == 0, 20, "queue drained")

            async def caught_up() -> bool:
                # Lag is measured from the group's saved position, which the owner writes
                # every few seconds, not at each completion.
                await observer.refresh()
                return otel.total("pgcg.group.lag", **mine) == 0

            await await_for(caught_up, 10, "the saved position to catch up")
            assert {p.value for p in otel.points("pgcg.group.lag.age", **mine)} == {0}
            # The coordinator first: the consumer's leaving would start a rebalance that
            # the stop could cut off between its metric and its outcome.
            await coordinator.stop()
            consumer.stop()
            await await_for(lambda: consumer.stopped, 10, "consumer stopped")
    finally:
        observer.close()

    rebalances = otel.points("pgcg.rebalances", **mine)
    outcomes = [o for o in coordinator.outcomes if o.group == group]
    # The first one's reason is the election or the member's join, whichever it saw first.
    assert {p.attributes["pgcg.reason"] for p in rebalances} == {
        reason_kind(o.reason) for o in outcomes
    }
    assert sum(p.value for p in rebalances) == len(
        [o for o in coordinator.outcomes if o.group == group]
    )
    (duration,) = otel.points("pgcg.rebalance.duration", **mine)
    assert duration.count == sum(p.value for p in rebalances)
    moved = otel.points("pgcg.rebalance.moves", **mine)
    moves = {p.attributes["pgcg.kind"]: p.value for p in moved}
    assert moves["assign"] >= 4
