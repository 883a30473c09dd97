"""The scenarios the log storage was built for, with real consumers: delays and retries that
must not fill memory, a deep key beside many small ones, two groups on one topic, and a
handler that kills its process."""

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
from tests.handlers import JOURNAL_DDL
from tests.helpers import (
    FAST_ENV,
    assign,
    await_for,
    fast_settings,
    parked,
    running,
    unfinished,
    wait_for,
)

pytestmark = pytest.mark.anyio

TOPIC = "orders"


def settings(**overrides: Any) -> Settings:
    return fast_settings({"drain_deadline": 2, "retry_base": 0.05, "retry_max": 0.2}, overrides)


async def test_delayed_messages_do_not_keep_due_ones_out_of_memory(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """300 messages delayed a minute on distinct keys, then 300 due ones, prefetch 200: the
    due ones are handled at once (the delayed ones wait in the parked queue, not in memory)."""
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    enqueue_many_sync(
        db, TOPIC, [OutgoingMessage(f"later-{i}", {"i": i}, delay=60) for i in range(300)]
    )
    due = enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"now-{i}", {"i": i}) for i in range(300)])
    handled: set[int] = set()

    async def handler(message: Message) -> None:
        handled.add(message.id)

    consumer = Consumer(
        settings(prefetch=200, park_after=5), group="g", topic=TOPIC, handler=handler, dsn=dsn
    )
    async with running(consumer):
        assign(db, "g", TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: {d.id for d in due} <= handled, 30, "every due message handled")
        assert consumer.ctx.scheduler.buffered() <= 200
    assert not {d.id for d in due} ^ handled, "a delayed message ran before its time"
    waiting = parked(db, "g")
    assert len(waiting) == 300 and all(r["waiting"] and r["origin"] == "delay" for r in waiting)


async def test_a_deep_key_does_not_starve_the_others(db: psycopg.Connection[Any], dsn: str) -> None:
    """1,000 messages on one key, then 1,000 on distinct keys, 10 handlers, prefetch 500:
    the distinct keys are all handled while the deep key still has most of its messages to
    go (it runs one at a time whatever we do; the others must not wait for it)."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    enqueue_many_sync(db, TOPIC, [OutgoingMessage("deep", {"i": i}) for i in range(1000)])
    others = enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"k{i}", {"i": i}) for i in range(1000)])
    deep_done = 0
    seen: list[int] = []
    order: dict[str, list[int]] = collections.defaultdict(list)

    async def handler(message: Message) -> None:
        nonlocal deep_done
        await anyio.sleep(0.001)
        order[message.key].append(message.payload["i"])
        if message.key == "deep":
            deep_done += 1
        else:
            seen.append(message.id)

    consumer = Consumer(
        settings(concurrency=10, prefetch=500), group="g", topic=TOPIC, handler=handler, dsn=dsn
    )
    async with running(consumer):
        assign(db, "g", TOPIC, [0], consumer.member_id)
        await await_for(lambda: len(seen) == len(others), 120, "every other key handled")
        assert deep_done < 500, f"the other keys waited for the deep one ({deep_done} done)"
        await await_for(lambda: deep_done == 1000, 240, "the deep key handled too")
    assert order["deep"] == list(range(1000)), "the deep key lost its order"
    assert unfinished(db, "g") == 0


async def test_two_groups_each_handle_every_message_in_order(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    ids = [
        e.id
        for e in enqueue_many_sync(
            db, TOPIC, [OutgoingMessage(f"k{i % 50}", {"i": i}) for i in range(2000)]
        )
    ]
    got: dict[str, list[Message]] = collections.defaultdict(list)

    def recorder(group: str) -> Any:
        async def handler(message: Message) -> None:
            if group == "audit":
                await anyio.sleep(0.002)  # one group slower than the other
            got[group].append(message)

        return handler

    billing = Consumer(
        settings(), group="billing", topic=TOPIC, handler=recorder("billing"), dsn=dsn
    )
    audit = Consumer(settings(), group="audit", topic=TOPIC, handler=recorder("audit"), dsn=dsn)
    async with running(billing, audit):
        assign(db, "billing", TOPIC, [0, 1, 2, 3], billing.member_id)
        assign(db, "audit", TOPIC, [0, 1, 2, 3], audit.member_id)
        await await_for(
            lambda: len(got["billing"]) >= 2000 and len(got["audit"]) >= 2000, 120, "both drained"
        )
    for group in ("billing", "audit"):
        assert sorted(m.id for m in got[group]) == sorted(ids), group
        per_key: dict[str, list[int]] = collections.defaultdict(list)
        for m in got[group]:
            per_key[m.key].append(m.payload["i"])
        assert all(v == sorted(v) for v in per_key.values()), group
        assert all(m.attempt == 1 for m in got[group])  # the other group's work is not theirs


@pytest.mark.slow
def test_a_handler_that_kills_its_process_is_dead_lettered_within_max_attempts(
    db: psycopg.Connection[Any], dsn: str, tmp_path: Any
) -> None:
    """A message whose handler calls os._exit: each delivery is counted before it runs, so
    after max_attempts deliveries it is dead-lettered with a reason, and the key beside it
    is handled."""
    from pgcg.bench.cluster import Cluster

    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    enqueue_many_sync(
        db,
        TOPIC,
        [OutgoingMessage("good", {"seq": 0}), OutgoingMessage("poison", {"kill": True})]
        + [OutgoingMessage("good", {"seq": i}) for i in range(1, 6)],
    )
    db.execute(JOURNAL_DDL)
    # One handler at a time: whatever runs beside a crash is charged with it (we cannot
    # tell who crashed the process), so here only the poison message may be in flight.
    env = {
        **FAST_ENV,
        "PGCG_CONCURRENCY": "1",
        "PGCG_MAX_ATTEMPTS": "3",
        "PGCG_RETRY_BASE": "0.05",
        "PGCG_RETRY_MAX": "0.1",
    }

    def dead_letters() -> int:
        return db.execute("SELECT count(*) AS n FROM pgcg.dead_letters").fetchone()["n"]

    with Cluster(dsn, tmp_path, env=env) as cluster:
        cluster.coordinator(name="coordinator")
        deaths = 0
        while not dead_letters():
            assert deaths <= 3, "still no dead letter after more deliveries than max_attempts"
            proc = cluster.consumer("g", TOPIC, "tests.handlers:kill_on_poison", name=f"c{deaths}")
            wait_for(
                lambda p=proc: p.popen.poll() is not None or dead_letters() > 0,
                60,
                "the poison message delivered (the consumer dies) or dead-lettered",
            )
            deaths += proc.popen.poll() is not None
        wait_for(lambda: unfinished(db, "g") == 0, 60, "everything else handled")
    (row,) = db.execute("SELECT key, attempts, reason FROM pgcg.dead_letters").fetchall()
    assert row["key"] == "poison" and row["attempts"] == 3
    assert "handler never returned" in row["reason"]
    assert deaths == 3, f"{deaths} deliveries before the dead letter, max_attempts is 3"
    handled = db.execute("SELECT seq, attempt FROM journal ORDER BY entry").fetchall()
    # The good key's messages are each handled once, in order, and never charged: the
    # charge for a crash falls only on what was in flight.
    firsts = [r["seq"] for r in handled if r["attempt"] == 1]
    assert sorted(set(firsts)) == list(range(6))


@pytest.mark.slow
def test_messages_running_beside_a_crashing_one_are_not_dead_lettered_with_it(
    db: psycopg.Connection[Any], dsn: str, tmp_path: Any
) -> None:
    """A crash is charged to every message that was running, since nothing tells which one
    killed the process. Run together again, they would all reach max_attempts with the
    crashing one; the ones charged run one at a time instead, so only the crashing message
    is dead-lettered and the healthy ones beside it are handled."""
    from pgcg.bench.cluster import Cluster

    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    healthy = [OutgoingMessage(f"good-{i}", {"seq": i}) for i in range(6)]
    enqueue_many_sync(db, TOPIC, [OutgoingMessage("poison", {"kill": True}), *healthy])
    db.execute(JOURNAL_DDL)
    env = {
        **FAST_ENV,
        "PGCG_CONCURRENCY": "8",
        "PGCG_MAX_ATTEMPTS": "3",
        # Healthy handlers still running when the crashing one starts beside them.
        "TEST_HANDLER_HOLD": "1",
    }

    def dead_letters() -> list[dict[str, Any]]:
        return db.execute("SELECT key, attempts, reason FROM pgcg.dead_letters").fetchall()

    with Cluster(dsn, tmp_path, env=env) as cluster:
        cluster.coordinator(name="coordinator")
        deaths = 0
        while not dead_letters():
            assert deaths <= 3 + len(healthy), "still no dead letter"
            proc = cluster.consumer("g", TOPIC, "tests.handlers:kill_on_poison", name=f"c{deaths}")
            wait_for(
                lambda p=proc: p.popen.poll() is not None or bool(dead_letters()),
                60,
                "the poison message delivered (the consumer dies) or dead-lettered",
            )
            deaths += proc.popen.poll() is not None
        wait_for(lambda: unfinished(db, "g") == 0, 60, "everything else handled")
    assert [(d["key"], d["attempts"]) for d in dead_letters()] == [("poison", 3)]
    ended = db.execute("SELECT DISTINCT seq FROM journal WHERE ended IS NOT NULL").fetchall()
    assert sorted(r["seq"] for r in ended) == list(range(len(healthy)))


async def test_a_revocation_called_off_mid_read_keeps_each_key_in_order(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A partition is revoked while its key's head runs and more of the key is produced,
    then the revocation is called off: what the member reads meanwhile and after must not
    start a later message of the key before the earlier ones (the claim design handed out a
    key's later message while earlier ones sat claimed but not in memory)."""
    from tests.helpers import COORD

    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"i": i}) for i in range(5)])
    gate = anyio.Event()
    order: list[int] = []
    running_now = 0
    overlap = False

    async def handler(message: Message) -> None:
        nonlocal running_now, overlap
        running_now += 1
        overlap = overlap or running_now > 1
        if message.payload["i"] == 0:
            await gate.wait()
        order.append(message.payload["i"])
        running_now -= 1

    consumer = Consumer(
        settings(concurrency=4, prefetch=3), group="g", topic=TOPIC, handler=handler, dsn=dsn
    )
    async with running(consumer):
        assign(db, "g", TOPIC, [0], consumer.member_id)
        await await_for(lambda: consumer.ctx.running == 1, 20, "the head in flight")
        params = {"group": "g", "topic": TOPIC, "partitions": [0]}
        db.execute(COORD.revoke, {**params, "targets": ["someone"], "drain_deadline_s": 60})
        db.execute(COORD.notify_group, {"group": "g"})
        owned = consumer.ctx.assignment.owned[0]
        await await_for(lambda: owned.state == "revoking", 20, "the revocation seen")
        enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"i": i}) for i in range(5, 10)])
        db.execute(COORD.unrevoke, params)
        db.execute(COORD.notify_group, {"group": "g"})
        await await_for(lambda: owned.state == "assigned", 20, "the revocation called off")
        enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"i": i}) for i in range(10, 15)])
        gate.set()
        await await_for(lambda: len(order) >= 15, 60, "the key handled")
        await await_for(lambda: unfinished(db, "g") == 0, 30, "the group's work settled")
    assert order == list(range(15)), "the key's order was broken"
    assert not overlap, "two messages of one key ran at once"
