"""An embedded consumer's lifecycle against a real PostgreSQL: stop() is safe before start,
twice, and after the end; the rebalance callbacks hear of each change, and a callback
that raises breaks nothing."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, fast_settings, key_in, owners, running, unfinished

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"


def settings(**overrides: Any) -> Settings:
    return fast_settings({"drain_deadline": 2}, overrides)


def members(db: psycopg.Connection[Any]) -> int:
    row = db.execute(
        "SELECT count(*) AS n FROM pgcg.consumer_groups WHERE group_name = %s", (GROUP,)
    ).fetchone()
    assert row is not None
    return int(row["n"])


async def nothing(message: Message[Any]) -> None:
    pass


def setup(db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))


async def test_stop_before_run_makes_run_return_without_joining(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db)
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=nothing, dsn=dsn)
    consumer.stop()
    consumer.stop()
    await consumer.run(install_signal_handlers=False)
    assert consumer.stopped and not consumer.joined.is_set()
    assert members(db) == 0


async def test_stop_twice_drains_once_and_stop_after_the_end_does_nothing(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db)
    handled: list[int] = []

    async def handler(message: Message[Any]) -> None:
        handled.append(message.id)

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assert members(db) == 1
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        ids = [e.id for e in enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", 1)])]
        await await_for(lambda: handled == ids, what="handled")
        consumer.stop()
        consumer.stop()
    assert consumer.stopped
    assert members(db) == 0  # left the group once, cleanly
    assert unfinished(db, GROUP) == 0
    consumer.stop()


# -- rebalance callbacks ----------------------------------------------------------------------


def revoke(db: psycopg.Connection[Any], partition: int) -> None:
    """What the coordinator's revoke does: drain by a deadline far away, then release."""
    db.execute(
        "UPDATE pgcg.partition_assignments SET state = 'revoking', "
        "revoke_deadline = now() + interval '60 seconds' "
        "WHERE group_name = %s AND partition = %s",
        (GROUP, partition),
    )
    db.execute("SELECT pg_notify('pgcg.g.' || %s, 'assignment')", (GROUP,))


def take_away(db: psycopg.Connection[Any], partition: int) -> None:
    """Another member holds the partition at a newer epoch: ours is lost, not handed over."""
    db.execute(
        "UPDATE pgcg.partition_assignments SET member_id = 'someone-else', epoch = epoch + 1 "
        "WHERE group_name = %s AND partition = %s",
        (GROUP, partition),
    )
    db.execute("SELECT pg_notify('pgcg.g.' || %s, 'assignment')", (GROUP,))


async def test_callbacks_hear_of_assignment_drained_revocation_and_loss(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup_partitions(db, 2)
    events: list[tuple[str, list[int]]] = []
    gate = anyio.Event()
    running_ids: set[int] = set()
    seen_at_revoke: list[Any] = []

    async def handler(message: Message[Any]) -> None:
        running_ids.add(message.id)
        await gate.wait()
        running_ids.discard(message.id)

    async def on_assigned(partitions: list[int]) -> None:
        events.append(("assigned", partitions))

    async def on_revoked(partitions: list[int]) -> None:
        # Drained, and not yet released: the next owner has not started.
        seen_at_revoke.append((set(running_ids), owners(db, GROUP)[0][0]))
        events.append(("revoked", partitions))

    def on_lost(partitions: list[int]) -> None:
        events.append(("lost", partitions))

    callbacks = {"on_assigned": on_assigned, "on_revoked": on_revoked, "on_lost": on_lost}
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
                        **callbacks)  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: events == [("assigned", [0, 1])], what="on_assigned")
        (in_flight,) = produce_to(db, 0)
        await await_for(lambda: running_ids == {in_flight}, what="a handler in flight")
        revoke(db, 0)
        await await_for(lambda: consumer.ctx.assignment.owned[0].state == "revoking",
                        what="the revocation seen")  # fmt: skip
        gate.set()
        await await_for(lambda: owners(db, GROUP)[0][0] is None, what="partition 0 released")
        take_away(db, 1)
        await await_for(lambda: len(events) == 3, what="on_lost")
    assert events == [("assigned", [0, 1]), ("revoked", [0]), ("lost", [1])]
    assert seen_at_revoke == [(set(), consumer.member_id)]


async def test_a_failing_callback_is_logged_and_the_consumer_goes_on(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    setup_partitions(db, 2)
    handled: list[int] = []

    async def handler(message: Message[Any]) -> None:
        handled.append(message.id)

    async def broken(partitions: list[int]) -> None:
        raise RuntimeError("callback bug")

    def broken_sync(partitions: list[int]) -> None:
        raise RuntimeError("callback bug")

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
                        on_assigned=broken, on_revoked=broken_sync, on_lost=broken)  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        ids = produce_to(db, 0) + produce_to(db, 1)
        await await_for(lambda: sorted(handled) == sorted(ids), what="handled")
        revoke(db, 0)
        await await_for(lambda: owners(db, GROUP)[0][0] is None, what="partition 0 released")
        take_away(db, 1)
        await await_for(lambda: 1 not in consumer.ctx.assignment.owned, what="1 lost")
        (more,) = produce_to(db, 0)
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: more in handled, what="still consuming")
        every = {"on_assigned", "on_revoked", "on_lost"}
        await await_for(lambda: failed_callbacks(caplog) >= every, what="failures logged")
    assert consumer.stopped


def failed_callbacks(caplog: pytest.LogCaptureFixture) -> set[str]:
    return {
        r.callback  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "action", None) == "rebalance_callback_failed"
    }


def setup_partitions(db: psycopg.Connection[Any], partitions: int) -> None:
    db.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, partitions))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))


def produce_to(db: psycopg.Connection[Any], partition: int) -> list[int]:
    msgs = [OutgoingMessage(key_in(partition, 2), {"p": partition})]
    return [e.id for e in enqueue_many_sync(db, TOPIC, msgs)]  # type: ignore[misc]
