"""The consumer's data path against a real PostgreSQL: per-key FIFO, fencing, retries."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg.consumer import reader
from pgcg.consumer.handlers import RetryPolicy
from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import (
    assign,
    await_for,
    fast_settings,
    key_in,
    owners,
    parked,
    pending,
    running,
    unfinished_ids,
)
from tests.logclient import tick_now

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"


DEFAULTS: dict[str, Any] = {
    "retry_base": 0.05,
    "retry_max": 0.2,
    "max_attempts": 3,
    "drain_deadline": 2,
}


def settings(**overrides: Any) -> Settings:
    return fast_settings(DEFAULTS, overrides)


class Recorder:
    """Records handling; fails on purpose where asked; detects concurrent handling of a key."""

    def __init__(self, fail: dict[int, int] | None = None, delay: float = 0.0) -> None:
        self.handled: list[Message] = []
        self.active: collections.Counter[str] = collections.Counter()
        self.overlaps: list[str] = []
        self.fail = fail or {}  # message id -> failures before success
        self.delay = delay

    async def __call__(self, message: Message) -> None:
        self.active[message.key] += 1
        if self.active[message.key] > 1:
            self.overlaps.append(message.key)
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            if self.fail.get(message.id, 0) >= message.attempt:
                raise RuntimeError(f"boom {message.id} attempt {message.attempt}")
            self.handled.append(message)
        finally:
            self.active[message.key] -= 1


def setup_topic(db: psycopg.Connection[Any], partitions: int = 4) -> None:
    db.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, partitions))


def produce(db: psycopg.Connection[Any], n: int, keys: int) -> list[int]:
    msgs = [OutgoingMessage(f"k{i % keys}", {"seq": i}) for i in range(n)]
    return [e.id for e in enqueue_many_sync(db, TOPIC, msgs)]  # type: ignore[misc]


async def test_drains_in_key_order(db: psycopg.Connection[Any], dsn: str) -> None:
    setup_topic(db)
    ids = produce(db, 600, 30)
    recorder = Recorder(delay=0.001)
    consumer = Consumer(
        settings(concurrency=8), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn
    )
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1, 2, 3], consumer.member_id)
        await await_for(lambda: len(recorder.handled) == len(ids), 30, "all messages handled")
    assert pending(db, TOPIC) == 0
    assert not recorder.overlaps
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for m in recorder.handled:
        by_key[m.key].append(m.payload["seq"])
    assert all(seqs == sorted(seqs) for seqs in by_key.values())
    assert sorted(m.id for m in recorder.handled) == sorted(ids)


async def test_a_free_handler_slot_starts_the_next_key_in_the_same_write_as_the_result(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Every start is marked in the database before its handler runs (the epoch fence).
    With one handler, the next key's start goes in the same write round as the result
    that freed the slot: waiting for that result's commit to start it cost two round
    trips per message, and a consumer with few handlers ran at a fraction of their pace."""
    setup_topic(db, 1)
    ids = produce(db, 40, 40)  # every message its own key: none waits for another
    recorder = Recorder(delay=0.001)
    consumer = Consumer(
        settings(concurrency=1), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn
    )
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: len(recorder.handled) == len(ids), 30, "all messages handled")
        await await_for(lambda: pending(db, TOPIC) == 0, 10, "every result written")
        rounds = consumer.writer.rounds
    # A round per message and a few more (the first start, a position saved); two rounds
    # per message without the shared round.
    assert rounds <= len(ids) * 1.25, f"{rounds} write rounds for {len(ids)} messages"


# -- more scenarios --------------------------------------------------------------------------


def enqueue(db: psycopg.Connection[Any], *messages: tuple[str, Any]) -> list[int]:
    done = enqueue_many_sync(db, TOPIC, [OutgoingMessage(k, p) for k, p in messages])
    return [e.id for e in done]  # type: ignore[misc]


def row_ids(db: psycopg.Connection[Any]) -> set[int]:
    """Ids of the messages the group has not finished."""
    return unfinished_ids(db, GROUP)


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


class FixedRetry(RetryPolicy):
    """The retry schedule without its jitter, so a test knows a retry is still far off."""

    def __init__(self, max_attempts: int, delay: float) -> None:
        super().__init__(max_attempts, delay, delay)
        self.fixed = delay

    def delay(self, attempt: int) -> float:
        return self.fixed


async def test_many_keys_keep_order_under_concurrency(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup_topic(db, partitions=8)
    ids = produce(db, 2000, 100)
    recorder = Recorder()
    consumer = Consumer(
        settings(concurrency=20, prefetch=300), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn
    )
    async with running(consumer):
        assign(db, GROUP, TOPIC, list(range(8)), consumer.member_id)
        await await_for(lambda: len(recorder.handled) >= len(ids), 60, "all messages handled")
    assert pending(db, TOPIC) == 0
    assert not recorder.overlaps
    assert sorted(m.id for m in recorder.handled) == sorted(ids)  # each exactly once
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for m in recorder.handled:
        by_key[m.key].append(m.payload["seq"])
    assert len(by_key) == 100
    assert all(seqs == sorted(seqs) for seqs in by_key.values())


@pytest.mark.parametrize("outcome", ["ack", "retry", "dead_letter"])
async def test_zombie_result_is_rejected_while_owned_partitions_still_ack(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture, outcome: str
) -> None:
    """The partition's epoch moves on while a handler runs: its result (ack, retry or dead
    letter) must change nothing, and the ack of a partition still owned, written in the
    same period, must go through."""
    caplog.set_level(logging.INFO, logger="pgcg")
    setup_topic(db, partitions=2)
    stale, owned = enqueue(db, (key_in(0, 2), "stale"), (key_in(1, 2), "owned"))
    gate = anyio.Event()
    started: set[int] = set()
    handled: list[tuple[int, int]] = []

    async def handler(message: Message) -> None:
        started.add(message.id)
        await gate.wait()
        if message.id == stale and message.attempt == 1 and outcome != "ack":
            raise RuntimeError("zombie failure")
        handled.append((message.id, message.attempt))

    # Heartbeats far apart and a long lease: between the epoch bump and the result, nothing
    # but the fenced write itself may notice the change (the blocker below makes sure).
    consumer = Consumer(
        settings(heartbeat_interval=2, session_timeout=20, drain_deadline=20,
                 max_attempts=1 if outcome == "dead_letter" else 3),
        group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
    )  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: started == {stale, owned}, what="both handlers running")
        with psycopg.connect(dsn) as blocker:
            # Hold the member row so the heartbeat (which would see the new epoch and
            # cancel the handler before it can finish) waits until the results are written.
            blocker.execute(
                "SELECT 1 FROM pgcg.consumer_groups WHERE member_id = %s FOR UPDATE",
                (consumer.member_id,),
            )
            db.execute(
                "UPDATE pgcg.partition_assignments SET epoch = epoch + 1 "
                "WHERE group_name = %s AND partition = 0",
                (GROUP,),
            )
            gate.set()
            await await_for(lambda: actions(caplog, "ack_rejected"), what="ack_rejected log")
            await await_for(lambda: owned not in row_ids(db), what="the owned partition's ack")
            assert stale in row_ids(db), "a zombie's result was written"
            assert parked(db, GROUP) == [], "a zombie's retry was written"
            assert db.execute("SELECT * FROM pgcg.dead_letters").fetchall() == []
            (rejected,) = actions(caplog, "ack_rejected")
            assert (rejected.partition, rejected.count) == (0, 1)  # type: ignore[attr-defined]
            assert (owned, 1) in handled
            blocker.rollback()
        # The member still owns partition 0, under the new epoch: the cut-off delivery
        # counts as an attempt, and the message comes back as a new delivery, acked this
        # time; with one attempt allowed, it was its only one: dead-lettered.
        await await_for(lambda: stale not in row_ids(db), what="redelivery under the new epoch")
    assert len(actions(caplog, "ack_rejected")) == 1
    dead = db.execute("SELECT message_id, reason FROM pgcg.dead_letters").fetchall()
    if outcome == "dead_letter":
        assert [d["message_id"] for d in dead] == [stale]
        assert "handler never returned" in dead[0]["reason"]
        assert (stale, 2) not in handled
    else:
        assert (stale, 2) in handled
        assert dead == []


async def test_always_failing_message_is_dead_lettered_before_its_key_moves_on(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg")
    setup_topic(db, partitions=2)
    poison, *after = enqueue(db, *[("k", {"seq": i}) for i in range(4)])
    others = enqueue(db, *[("j", {"seq": i}) for i in range(4)])
    attempts: list[int] = []
    handled: list[tuple[int, bool]] = []  # id, poison already in dead_letters when handled

    async def handler(message: Message) -> None:
        if message.id == poison:
            attempts.append(message.attempt)
            raise ValueError(f"poison pill, attempt {message.attempt}")
        async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
            cur = await conn.execute(
                "SELECT count(*) AS n FROM pgcg.dead_letters WHERE message_id = %s", (poison,)
            )
            row = await cur.fetchone()
        handled.append((message.id, bool(row and row["n"])))

    consumer = Consumer(
        settings(max_attempts=3), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn
    )
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: len(handled) == 7, what="everything but the poison handled")
    assert attempts == [1, 2, 3]
    assert [i for i, _ in handled if i in after] == after  # in order, after the poison
    assert all(dead for i, dead in handled if i in after)
    assert {i for i, _ in handled} == set(after) | set(others)
    assert pending(db, TOPIC) == 0
    (dead,) = db.execute("SELECT * FROM pgcg.dead_letters").fetchall()
    assert dead["message_id"] == poison
    assert (dead["key"], dead["payload"], dead["topic"]) == ("k", {"seq": 0}, TOPIC)
    assert dead["attempts"] == 3
    assert "ValueError: poison pill, attempt 3" in dead["last_error"]
    assert (dead["group_name"], dead["member_id"]) == (GROUP, consumer.member_id)
    assert len(actions(caplog, "message_retry")) == 2
    (logged,) = actions(caplog, "message_dead_lettered")
    assert logged.message_id == poison  # type: ignore[attr-defined]


async def test_failed_message_is_retried_and_its_key_waits_while_others_proceed(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup_topic(db, partitions=2)
    slow_key = key_in(0, 2, "slow")
    first, *later = enqueue(db, *[(slow_key, {"seq": i}) for i in range(3)])
    # other keys, in the slow key's partition and in the other one
    others = enqueue(
        db, *[(key_in(p, 2, f"other{n}"), {"seq": n}) for n in range(10) for p in (0, 1)]
    )
    retrying = anyio.Event()
    gate = anyio.Event()
    handled: list[tuple[int, int]] = []

    async def handler(message: Message) -> None:
        if message.id == first and message.attempt == 1:
            raise RuntimeError("transient")
        if message.id == first:
            retrying.set()
            await gate.wait()
        handled.append((message.id, message.attempt))

    consumer = Consumer(settings(concurrency=4), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await retrying.wait()
        # The slow key's retry is in flight: every other key is done, none of its own.
        await await_for(
            lambda: {i for i, _ in handled} == set(others), what="other keys handled meanwhile"
        )
        assert not any(i in later for i, _ in handled)
        gate.set()
        await await_for(lambda: len(handled) == len(others) + 3, what="the slow key handled")
    assert [(i, a) for i, a in handled if i in (first, *later)] == [
        (first, 2),
        (later[0], 1),
        (later[1], 1),
    ]
    assert pending(db, TOPIC) == 0


async def test_delayed_retry_blocks_its_key_after_a_hand_off(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The new owner sees only rows: A waits for its retry, B (same key, later) is due.
    B must still wait for A."""
    setup_topic(db, partitions=1)
    a, b, other = enqueue(db, ("k", "A"), ("k", "B"), ("j", "other"))
    handled: list[tuple[str, int, int]] = []  # consumer, id, attempt

    def handler_for(name: str) -> Any:
        async def handler(message: Message) -> None:
            if message.id == a and message.attempt == 1:
                raise RuntimeError("not yet")
            handled.append((name, message.id, message.attempt))

        return handler

    first = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler_for("first"), dsn=dsn)
    second = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler_for("second"), dsn=dsn)
    first.ctx.retry = FixedRetry(max_attempts=3, delay=1.5)
    async with running(first, second):
        assign(db, GROUP, TOPIC, [0], first.member_id)

        def failed_once() -> bool:
            rows = parked(db, GROUP)
            return bool(
                rows
                and rows[0]["id"] == a
                and rows[0]["attempts"] == 1
                and rows[0]["last_error"]
                and rows[0]["waiting"]
            )

        await await_for(failed_once, what="A's failure recorded, its retry not yet due")
        await await_for(lambda: ("first", other, 1) in handled, what="the other key handled")
        # B went to the parked queue behind waiting A: the key's order lives in the rows.
        await await_for(
            lambda: [r["id"] for r in parked(db, GROUP)] == [a, b], what="B parked behind A"
        )
        assign(db, GROUP, TOPIC, [0], second.member_id)
        await await_for(
            lambda: 0 in second.ctx.assignment.owned and second.ctx.assignment.owned[0].adopted,
            what="the new owner adopted the partition",
        )
        assert not any(i == b for _, i, _ in handled)
        await await_for(lambda: any(i == b for _, i, _ in handled), what="B handled")
    # B was never delivered before, so it is on its first attempt.
    assert handled[1:] == [("second", a, 2), ("second", b, 1)]
    assert pending(db, TOPIC) == 0


async def test_revoked_partition_is_released_once_its_failed_message_is_nacked(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A revoked partition drains its in-flight work. A message that fails meanwhile is
    not retried here (it is parked with its retry time for the next owner): the partition
    is released as soon as the failure is written, not at the drain deadline."""
    caplog.set_level(logging.INFO, logger="pgcg")
    setup_topic(db, partitions=1)
    (first,) = enqueue(db, ("k", "A"))
    gate = anyio.Event()
    attempts: list[int] = []

    async def handler(message: Message) -> None:
        attempts.append(message.attempt)
        await gate.wait()
        raise RuntimeError("downstream is down")

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    # Full jitter can draw a delay of ~0: the retry is due at once, the worst case.
    consumer.ctx.retry = FixedRetry(max_attempts=3, delay=0)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: attempts == [1], what="A in flight")
        # what the coordinator's revoke does: drain by a deadline far away, then release
        db.execute(
            "UPDATE pgcg.partition_assignments SET state = 'revoking', "
            "revoke_deadline = now() + interval '30 seconds' WHERE group_name = %s",
            (GROUP,),
        )
        db.execute("SELECT pg_notify('pgcg.g.' || %s, 'assignment')", (GROUP,))
        await await_for(lambda: actions(caplog, "partition_revoking"), what="revoke seen")
        gate.set()
        await await_for(lambda: actions(caplog, "partition_released"), 60, "released")
    assert not actions(caplog, "drain_deadline")
    assert attempts == [1]
    assert owners(db, GROUP)[0] == (None, 2, "unassigned")
    (row,) = parked(db, GROUP)
    assert row["id"] == first and row["attempts"] == 1 and row["claimed_epoch"] is None
    assert "downstream is down" in row["last_error"]


async def test_a_start_refused_by_a_fresh_revocation_keeps_the_work_in_flight(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader begins revoking a partition; before the owner's heartbeat hears of it,
    the owner tries to start another message there, which the database refuses (nothing
    new may start on a revoking partition). That refusal is no loss of the partition: the
    handler in flight must finish and its ack be accepted, not be cancelled and handled
    again by the next owner (found by `pgcg chaos`: a redelivery with no fault)."""
    caplog.set_level(logging.INFO, logger="pgcg")
    setup_topic(db, partitions=1)
    (first,) = enqueue(db, ("a", "A"))
    gate = anyio.Event()
    handled: list[int] = []

    async def handler(message: Message) -> None:
        if message.id == first:
            await gate.wait()
        handled.append(message.id)

    # A slow heartbeat: the refusal comes long before the heartbeat would see the revoke.
    consumer = Consumer(
        settings(heartbeat_interval=5, session_timeout=30, drain_deadline=30),
        group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
    )  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: 0 in consumer.ctx.assignment.owned, what="assigned")
        await await_for(lambda: consumer.ctx.running == 1, what="A in flight")
        # What the coordinator's revoke does, without telling the member.
        db.execute(
            "UPDATE pgcg.partition_assignments SET state = 'revoking', "
            "revoke_deadline = now() + interval '30 seconds' WHERE group_name = %s",
            (GROUP,),
        )
        enqueue(db, ("b", "B"))
        await await_for(lambda: actions(caplog, "partition_revoking"), 20, "revoke seen")
        gate.set()
        await await_for(lambda: first in handled, 10, "A finished")
        await await_for(lambda: first not in row_ids(db), 10, "A's ack accepted")
    assert not actions(caplog, "partition_lost"), [r.getMessage() for r in caplog.records]
    assert handled.count(first) == 1


async def test_a_key_waiting_for_its_retry_does_not_starve_other_keys(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup_topic(db, partitions=2)
    hot = key_in(0, 2, "hot")
    first, *_ = enqueue(db, *[(hot, {"seq": i}) for i in range(60)])
    others = enqueue(db, *[(key_in(p, 2, f"other{n}"), n) for n in range(10) for p in (0, 1)])
    handled: list[int] = []

    async def handler(message: Message) -> None:
        if message.id == first and message.attempt == 1:
            raise RuntimeError("downstream is down")
        handled.append(message.id)

    consumer = Consumer(settings(prefetch=20), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    consumer.ctx.retry = FixedRetry(max_attempts=3, delay=60)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1], consumer.member_id)
        await await_for(lambda: set(others) <= set(handled), 5, "other keys handled")

        # The waiting key left memory for the parked queue, in its order, head first.
        def hot_parked() -> bool:
            rows = parked(db, GROUP)
            return (
                len(rows) == 60
                and rows[0]["id"] == first
                and rows[0]["attempts"] == 1
                and rows[0]["waiting"]
            )

        await await_for(hot_parked, 5, "the hot key parked, its head waiting for the retry")
        rows = parked(db, GROUP)
        assert all(r["key"] == hot and r["attempts"] == 0 for r in rows[1:])
        assert first not in handled and not set(handled) - set(others)


async def test_a_waiting_key_resumes_in_order_without_extra_attempts(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup_topic(db, partitions=1)
    hot = key_in(0, 1, "hot")
    ids = enqueue(db, *[(hot, {"seq": i}) for i in range(40)])
    others = enqueue(db, *[(key_in(0, 1, f"other{n}"), n) for n in range(10)])
    handled: list[Message] = []

    async def handler(message: Message) -> None:
        if message.id == ids[0] and message.attempt == 1:
            raise RuntimeError("downstream is down")
        handled.append(message)

    consumer = Consumer(settings(prefetch=10), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    consumer.ctx.retry = FixedRetry(max_attempts=3, delay=1.0)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: len(handled) == 50, 20, "everything handled")
    hot_handled = [m for m in handled if m.key == hot]
    assert [m.id for m in hot_handled] == ids
    assert hot_handled[0].attempt == 2
    assert all(m.attempt == 1 for m in hot_handled[1:]), "put-back messages counted an attempt"
    assert {m.id for m in handled} >= set(others)


async def test_a_deep_parked_key_loads_its_next_messages_as_its_last_loaded_one_settles(
    db: psycopg.Connection[Any], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parked key is loaded FOLLOWERS messages at a time. Found by pgcg bench drain
    --handler parked: a key whose loaded messages were all handled stood idle until the
    reader's next look at the parked queue, so a deep key drained several times slower
    than from the log. Once the key's first batch is in memory the periodic look is put
    an hour off: the rest of the key is handled only if each batch's last settle loads the
    next."""
    setup_topic(db, partitions=1)
    hot = key_in(0, 1, "hot")
    ids = enqueue(db, *[(hot, {"seq": i}) for i in range(3 * (reader.FOLLOWERS + 1) + 1)])
    handled: list[Message] = []

    async def handler(message: Message) -> None:
        if message.id == ids[0] and message.attempt == 1:
            raise RuntimeError("downstream is down")  # the key goes to the parked queue
        handled.append(message)

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    consumer.ctx.retry = FixedRetry(max_attempts=3, delay=0.5)
    scheduler = consumer.ctx.scheduler
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(
            lambda: any(i.parked for i in scheduler.items_of(hot)), what="the key's first batch"
        )
        monkeypatch.setattr(reader, "PARKED_LOAD_INTERVAL", 3600.0)
        await await_for(lambda: len(handled) == len(ids), 20, "the whole key handled")
    assert [m.id for m in handled] == ids
    assert parked(db, GROUP) == []


async def test_a_retry_is_the_next_attempt_until_dead_lettered(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup_topic(db, partitions=1)
    recovers, fails = produce(db, 2, 2)
    recorder = Recorder(fail={recovers: 2, fails: 99})
    consumer = Consumer(
        settings(max_attempts=3), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: pending(db, TOPIC) == 0, 20, "handled or dead-lettered")
        consumer.stop()
    assert [(m.id, m.attempt) for m in recorder.handled] == [(recovers, 3)]
    dead = db.execute("SELECT message_id, attempts FROM pgcg.dead_letters").fetchall()
    assert dead == [{"message_id": fails, "attempts": 3}]


async def test_a_release_does_not_hand_on_a_partition_whose_revocation_was_called_off(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Found by pgcg chaos: the leader called a revocation off (the target left) while the
    member was releasing; the release handed the partition to nobody anyway, so handlings
    already started on it again had their acks rejected and were redone elsewhere."""
    setup_topic(db, partitions=1)
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=Recorder(), dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: 0 in consumer.ctx.assignment.owned, what="partition 0 owned")
        owned = consumer.ctx.assignment.owned[0]
        # The database says assigned (revocation called off) when the release runs.
        await consumer._release([owned], reason="revoked", revoked_only=True)
        row = db.execute(
            "SELECT member_id, epoch, state FROM pgcg.partition_assignments WHERE partition = 0"
        ).fetchone()
        assert row == {"member_id": consumer.member_id, "epoch": owned.epoch, "state": "assigned"}
        assert consumer.ctx.assignment.owned.get(0) is owned


async def test_a_result_written_twice_keeps_an_owned_partition(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Found by pgcg chaos: after a connection loss, a result our own earlier write had
    already recorded was taken for a zombie's, and the member dropped a partition it still
    owned. Results are idempotent: the same round written again is accepted."""
    from pgcg.consumer.writer import Result, _Round

    setup_topic(db, partitions=1)
    (first,) = enqueue(db, ("k", "A"))
    gate = anyio.Event()

    async def handler(message: Message) -> None:
        await gate.wait()

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: consumer.ctx.running == 1, what="A in flight")
        owned = consumer.ctx.assignment.owned[0]
        (item,) = [
            i for k in consumer.ctx.scheduler.keys(0) for i in consumer.ctx.scheduler.items_of(k)
        ]
        # What a lost reply leads to: the same result written twice.
        for _ in range(2):
            await consumer.writer._write(_Round(results=[Result(item)]))
        assert consumer.ctx.assignment.owned.get(0) is owned
        assert first not in row_ids(db)
        gate.set()


async def test_a_late_heartbeat_answer_does_not_push_the_revocation_deadline_back(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The leader forces a hand-off at the database's revoke_deadline. The heartbeat that
    brings the revocation tells how far off it is as of when the heartbeat ran, so the
    owner must count from when it sent it: counting from a late answer would let it go on
    working past the forced hand-off, beside the partition's next owner."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"n": 1})])
    release = anyio.Event()
    started = anyio.Event()

    async def hold(message: Message) -> None:
        started.set()  # in flight, so the revoked partition waits for its deadline
        await release.wait()

    def last_heartbeat() -> Any:
        return db.execute(
            "SELECT last_heartbeat AS t FROM pgcg.consumer_groups WHERE member_id = %s",
            (consumer.member_id,),
        ).fetchone()["t"]  # type: ignore[index]

    # Heartbeats 3 s apart leave room to set the scene between two of them; the lease
    # (10 s less a 2 s margin) outlasts one interval plus the answer's delay.
    cfg = settings(heartbeat_interval=3, session_timeout=10, drain_deadline=10)
    consumer = Consumer(cfg, group=GROUP, topic=TOPIC, handler=hold, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        with anyio.fail_after(20):
            await started.wait()
        before = last_heartbeat()
        await await_for(lambda: last_heartbeat() != before, 10, "a heartbeat just answered")
        delay = 3.0  # longer than the lease margin
        with psycopg.connect(dsn) as blocker:
            # The revocation is committed before the next heartbeat starts, so that
            # heartbeat sees it; then it waits on the member's row, which we hold.
            blocker.execute(
                "SELECT 1 FROM pgcg.consumer_groups WHERE member_id = %s FOR UPDATE",
                (consumer.member_id,),
            )
            db.execute(
                "UPDATE pgcg.partition_assignments SET state = 'revoking', "
                "target_member_id = 'someone-else', revoke_deadline = now() + interval '12 s' "
                "WHERE group_name = %s AND partition = 0",
                (GROUP,),
            )
            await await_for(
                lambda: (
                    db.execute(
                        "SELECT count(*) AS n FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND application_name = %s",
                        (f"pgcg-member:{GROUP}",),
                    ).fetchone()["n"]
                    == 1
                ),  # type: ignore[index]
                10,
                "the heartbeat waiting on the member's row",
            )
            assert consumer.ctx.assignment.owned[0].state == "assigned", "not seen yet"
            await anyio.sleep(delay)  # the answer is late by this much (what is tested)
            blocker.rollback()
        owned = consumer.ctx.assignment.owned
        await await_for(
            lambda: 0 in owned and owned[0].state == "revoking", 10, "the revocation seen"
        )
        local_left = owned[0].revoke_by - time.monotonic()  # type: ignore[operator]
        db_left = db.execute(
            "SELECT extract(epoch FROM revoke_deadline - clock_timestamp())::float8 AS s "
            "FROM pgcg.partition_assignments WHERE group_name = %s AND partition = 0",
            (GROUP,),
        ).fetchone()["s"]  # type: ignore[index]
        # The owner stops a margin before the database's deadline. Counting from the late
        # answer, it would think it had `delay` seconds more than the database gives it.
        assert local_left <= db_left - cfg.lease_margin + 0.5, (local_left, db_left)
        release.set()


async def test_a_steady_flow_is_handled_once_and_every_position_moves_on(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    # Many small fetches over several partitions: a fetch that listed one partition twice
    # (its order rotated by two readings of a clock) handled its messages twice, and the
    # second copy held that partition's position, and so retention, for good.
    setup_topic(db, partitions=4)
    recorder = Recorder()
    consumer = Consumer(
        settings(concurrency=20), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn
    )
    ids: list[int] = []
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0, 1, 2, 3], consumer.member_id)
        for round_ in range(60):
            ids += enqueue(db, *((f"k{round_}-{n}", {"n": n}) for n in range(8)))
            want = len(ids)
            await await_for(lambda w=want: len(recorder.handled) >= w, 20, "the round handled")
        newest = db.execute(
            "SELECT max(tick) AS tick FROM pgcg.ticks AS k"
            " JOIN pgcg.topics AS t ON t.id = k.topic_id"
            " WHERE t.name = %s",
            (TOPIC,),
        ).fetchone()["tick"]  # type: ignore[index,call-overload]

        def positions() -> list[int]:
            rows = db.execute(
                "SELECT gp.tick FROM pgcg.group_progress AS gp"
                " JOIN pgcg.groups AS g ON g.id = gp.group_id WHERE g.group_name = %s",
                (GROUP,),
            ).fetchall()
            return [r["tick"] for r in rows]  # type: ignore[call-overload]

        await await_for(
            lambda: len(positions()) == 4 and min(positions()) >= newest,
            20,
            "every partition's saved position past the last message",
        )
    handled = [m.id for m in recorder.handled]
    assert sorted(handled) == sorted(ids), "each message handled exactly once"


@contextlib.asynccontextmanager
async def marked_head(
    db: psycopg.Connection[Any], dsn: str, bodies: tuple[str, ...] = ("A",)
) -> AsyncIterator[tuple[Consumer, Any, list[int]]]:
    """A consumer owning the one partition of a new topic, with one key's messages (one per
    body) read, and the first marked (cleared to start) but not handed to a handler; the
    others wait behind it in memory. The tests below then play the writer's and the
    assignment's steps by hand, in the order a race would. Yields the consumer, the head's
    item and the ids of every message enqueued."""
    setup_topic(db, partitions=1)
    ids = enqueue(db, *(("k", body) for body in bodies))

    async def handler(message: Message) -> None:
        raise AssertionError("not run here")

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    ctx = consumer.ctx
    await ctx.membership.join()
    try:
        assign(db, GROUP, TOPIC, [0], ctx.member_id)
        ctx.assignment.apply(await ctx.membership.heartbeat() or [])
        # A reader makes ticks at most once per tick interval: make the one that shows
        # the messages now.
        tick_now(db, TOPIC)
        assert await consumer.reader.read_once() == len(bodies)
        (item,) = ctx.scheduler.take(time.monotonic(), 10)
        assert item.id == ids[0]
        consumer.writer.start([item])
        await consumer.writer.flush()  # marked: cleared to start
        yield consumer, item, ids
    finally:
        await consumer._close()


@contextlib.asynccontextmanager
async def one_marked_message(
    db: psycopg.Connection[Any], dsn: str
) -> AsyncIterator[tuple[Consumer, Any]]:
    """marked_head with a single message."""
    async with marked_head(db, dsn) as (consumer, item, _):
        yield consumer, item


async def test_the_fetch_returns_its_columns_in_the_order_the_reader_unpacks_them(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The fetch's rows are plain tuples, unpacked by position: a statement edited out of
    step with its reader is an error, not fields silently mixed up."""
    async with one_marked_message(db, dsn) as (consumer, _):
        conn = await consumer.reader._connection()
        part = consumer.ctx.assignment.owned[0]
        params = consumer.ctx.params(
            partitions=[part.partition], done=[part.done], cur=[None], cur_offsets=[None],
            limit=10, limit_bytes=1 << 20,
        )  # fmt: skip
        await consumer.reader._query(conn, reader.Q.fetch, params, reader.FETCHED)
        swapped = ("state", "partition", *reader.FETCHED[2:])
        with pytest.raises(RuntimeError, match="the reader expects"):
            await consumer.reader._query(conn, reader.Q.fetch, params, swapped)


def test_rotating_the_fetch_order_lists_each_partition_once() -> None:
    from pgcg.consumer.reader import rotated

    for n in range(6):
        items = list(range(n))
        for start in range(-3, 20):
            assert sorted(rotated(items, start)) == items


async def test_a_result_that_lands_after_the_lease_came_back_is_not_handled_again(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Found under heavy load (a duplicate in the cluster test): the lease ran out while a
    finished message's result was on its way to the writer, so the member let the
    partition go; the next heartbeat gave it back under the same epoch, and the re-adopt
    read the ledger before that result landed. The result still went through (same member,
    same epoch), and the message, read again from the position, was handled again."""
    from pgcg.consumer.writer import Result

    async with one_marked_message(db, dsn) as (consumer, item):
        ctx = consumer.ctx
        consumer.writer.submit(Result(item))  # the handler returned
        epoch = ctx.assignment.owned[0].epoch
        # Before the writer gets to it, the lease runs out: every partition is let go...
        ctx.assignment.lose_all("lease expired")
        # ...and the next heartbeat finds the member still owning it, at the same epoch.
        ctx.assignment.apply(await ctx.membership.heartbeat() or [])
        assert ctx.assignment.owned[0].epoch == epoch
        await consumer.reader.read_once()
        await consumer.writer.flush()  # lands: the same member still owns that epoch
        assert item.id not in row_ids(db)
        await consumer.reader.read_once()
        held = [i.id for k in ctx.scheduler.keys(0) for i in ctx.scheduler.items_of(k)]
        assert held == [], "a message whose completion committed is to be handled again"


async def test_a_head_that_finishes_while_its_key_is_being_parked_is_not_handled_again(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Found by pgcg chaos (a key's message handled again, after its later ones): a key was
    parked (it held the position too long) while its head ran, and the head finished before
    the writer sent the park. The park and the head's completion went in the same round:
    the completion finished the message in the log, and the park left a copy claimed by the
    finished handler in the parked queue, which was handled again once the claim ran out."""
    from pgcg.consumer.writer import Result

    async with one_marked_message(db, dsn) as (consumer, item):
        ctx = consumer.ctx
        consumer.writer.park_key("k", "pinned")  # the key holds the position: parked...
        consumer.writer.submit(Result(item))  # ...and its head returns before that is sent
        await consumer.writer.flush()
        await consumer.writer.flush()
        assert parked(db, GROUP) == [], "a finished message is left in the parked queue"
        assert item.id not in row_ids(db), "the completion committed"
        assert not ctx.scheduler.holds(item.uid)


async def test_a_message_finished_while_its_partition_is_read_back_is_not_read_again(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Found by pgcg chaos (a revocation called off): a message cleared to start when its
    partition was revoked went back to memory, and the revocation was called off. Reading
    the partition back (adopt) took the group's finished messages from the database; the
    message then ran and its completion committed, and the read that followed listed it
    again (it was no longer in memory, and the adopt had not seen it finished): handled
    twice."""
    from pgcg.consumer.member import AssignmentRow
    from pgcg.consumer.writer import Result

    async with one_marked_message(db, dsn) as (consumer, item):
        ctx = consumer.ctx
        epoch = ctx.assignment.owned[0].epoch
        # Revoked before a worker picked it up: it goes back to memory, not started...
        ctx.assignment.apply([AssignmentRow(0, epoch, "revoking", 30.0)])
        ctx.scheduler.unstart(item, time.monotonic())
        # ...and the revocation is called off: the partition is read back from the database.
        ctx.assignment.apply([AssignmentRow(0, epoch, "assigned", None)])
        part = ctx.assignment.owned[0]
        conn = await consumer.reader._connection()
        await consumer.reader._adopt(conn, part)
        assert part.adopted
        # The message runs and its completion commits before the read that follows.
        (again,) = ctx.scheduler.take(time.monotonic(), 10)
        assert again is item
        consumer.writer.start([item])
        await consumer.writer.flush()
        consumer.writer.submit(Result(item))
        await consumer.writer.flush()
        assert item.id not in row_ids(db), "the completion committed"
        await consumer.reader.read_once()
        held = [i.id for k in ctx.scheduler.keys(0) for i in ctx.scheduler.items_of(k)]
        assert held == [], "a message whose completion committed is to be handled again"


async def test_a_message_held_across_a_revocation_called_off_does_not_move_the_position(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Found by pgcg chaos (a message lost after a revocation called off, then a lease
    that ran out): a later batch's message held in memory across the revocation counted
    when the partition was read back, so before the cursor read again what the revocation
    had dropped (an earlier batch), the position was that later batch's and was saved. The
    next reading started there, and the dropped message was never handled."""
    from pgcg.consumer.member import AssignmentRow
    from pgcg.consumer.writer import Result

    setup_topic(db, partitions=1)
    first, second = enqueue(db, ("a", "A1"), ("a", "A2"))
    tick_now(db, TOPIC)
    (other,) = enqueue(db, ("b", "B1"))  # a batch after A2's
    tick_now(db, TOPIC)

    async def handler(message: Message) -> None:
        raise AssertionError("not run here")

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    ctx = consumer.ctx
    await ctx.membership.join()
    try:
        assign(db, GROUP, TOPIC, [0], ctx.member_id)
        ctx.assignment.apply(await ctx.membership.heartbeat() or [])
        assert await consumer.reader.read_once() == 3
        heads = {i.id: i for i in ctx.scheduler.take(time.monotonic(), 10)}
        assert sorted(heads) == sorted([first, other])
        consumer.writer.start([heads[first]])
        await consumer.writer.flush()  # A1 runs; A2 waits behind it in memory
        consumer.writer.start([heads[other]])  # B1's mark is on its way...
        # ...when the leader revokes: the mark is refused, and the revocation drops A2.
        db.execute(
            "UPDATE pgcg.partition_assignments SET state = 'revoking', "
            "revoke_deadline = now() + interval '30 seconds' WHERE group_name = %s",
            (GROUP,),
        )
        epoch = ctx.assignment.owned[0].epoch
        ctx.assignment.apply([AssignmentRow(0, epoch, "revoking", 30.0)])
        consumer.writer.submit(Result(heads[first]))
        await consumer.writer.flush()
        assert [i.id for i in ctx.scheduler.items_of("b")] == [other], "B1 back in memory"
        # The revocation is called off; the partition is read back, and its position saved
        # before the cursor gets to A2 again (memory full, a slow read).
        db.execute(
            "UPDATE pgcg.partition_assignments SET state = 'assigned', revoke_deadline = NULL "
            "WHERE group_name = %s",
            (GROUP,),
        )
        ctx.assignment.apply([AssignmentRow(0, epoch, "assigned", None)])
        part = ctx.assignment.owned[0]
        await consumer.reader._adopt(await consumer.reader._connection(), part)
        await consumer.writer.save_positions()
        assert second in row_ids(db), "the saved position passed A2, never handled"
    finally:
        await consumer._close()


async def test_rows_read_for_a_partition_revoked_meanwhile_are_not_taken_in(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Found by pgcg chaos (a revocation called off): a revocation drops what the partition
    holds but its running heads, and a read already on its way when it came brought a later
    message of a key in after it. Once the revocation was called off, that message ran
    right after the head, before the key's messages the revocation had dropped (they come
    back only when the partition is read again from its position)."""
    from pgcg.consumer.member import AssignmentRow
    from pgcg.consumer.reader import Q as READER_QUERIES

    async with marked_head(db, dsn, ("A1", "A2")) as (consumer, _, (_, second)):
        # A1 runs; A2 waits behind it in memory.
        ctx = consumer.ctx
        (third,) = enqueue(db, ("k", "A3"))
        tick_now(db, TOPIC)
        epoch = ctx.assignment.owned[0].epoch
        conn = await consumer.reader._connection()
        execute = conn.execute

        async def revoked_while_reading(query: Any, *args: Any, **kwargs: Any) -> Any:
            cur = await execute(query, *args, **kwargs)
            if query is READER_QUERIES.fetch:
                # The read has its rows; before it takes them in, the leader revokes.
                ctx.assignment.apply([AssignmentRow(0, epoch, "revoking", 30.0)])
            return cur

        conn.execute = revoked_while_reading  # type: ignore[method-assign]
        await consumer.reader.read_once()
        conn.execute = execute  # type: ignore[method-assign]
        # The revocation is called off: what the key holds must still be in its order.
        ctx.assignment.apply([AssignmentRow(0, epoch, "assigned", None)])
        held = [i.id for i in ctx.scheduler.items_of("k")]
        assert third not in held or second in held, (
            f"held {held}: A3 would run right after A1, before A2"
        )


async def test_a_failure_sent_again_after_its_reply_was_lost_counts_one_attempt(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The writer sends a round again when the connection broke before the answer came
    (it cannot know whether the first one committed): a failed delivery in it must be
    counted once, or a message would reach the dead letters early. Here the round did
    commit, and is sent again as is."""
    from pgcg.consumer.writer import Result, _Round

    async with one_marked_message(db, dsn) as (consumer, item):
        failed = Result(item, "boom", retry_after=3600)
        for _ in range(2):  # the round, then the same round again: the reply was lost
            await consumer.writer._settle(_Round(results=[failed]))
        (row,) = parked(db, GROUP)
        assert (row["id"], row["attempts"], row["last_error"]) == (item.id, 1, "boom")


async def test_a_read_the_server_never_answers_is_given_up_and_the_reader_goes_on(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server process that stops answering (seen: a backend hung for good) holds the
    reader only for its bound: then the read is given up, the connection dropped and the
    read made again. Unbounded, the reader waited forever while the heartbeat, on its own
    connection, kept the member and its partitions."""
    caplog.set_level(logging.WARNING, logger="pgcg.consumer.reader")
    setup_topic(db, partitions=1)
    ids = produce(db, 5, 5)
    recorder = Recorder()
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=recorder, dsn=dsn)
    consumer.reader.round_trip_bound = 1.0
    with psycopg.connect(dsn, autocommit=True) as locker:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            with locker.transaction():
                # Every read (the adopt first) waits on the parked queue while this lock
                # is held, and gets no answer; the heartbeat never touches that table.
                locker.execute("LOCK TABLE pgcg.parked IN ACCESS EXCLUSIVE MODE")
                assign(db, GROUP, TOPIC, [0], consumer.member_id)
                given_up = await await_for(
                    lambda: actions(caplog, "read_failed"), 20, "the unanswered read given up"
                )
                assert "no answer from PostgreSQL within 1s" in given_up[0].getMessage()
                assert not recorder.handled
            await await_for(lambda: len(recorder.handled) == len(ids), 30, "every message handled")
            consumer.stop()
    assert sorted(m.id for m in recorder.handled) == sorted(ids)


async def test_a_write_the_server_never_answers_is_given_up_and_written_again(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As a read: a round of results that gets no answer holds the writer only for its
    bound; then the connection is dropped and the round written again. Unbounded, every
    result (and with them the member's keys) waited forever while the heartbeat kept the
    member and its partitions. A statement given up still runs on the server and could
    commit after the round made again, so its server process is ended first: at no time
    do two of the writer's statements wait on the server."""
    caplog.set_level(logging.INFO, logger="pgcg.consumer.writer")
    setup_topic(db, partitions=1)
    ids = produce(db, 4, 4)
    release = anyio.Event()
    handled: list[int] = []
    started: set[int] = set()

    async def handler(message: Message) -> None:
        started.add(message.id)
        await release.wait()
        handled.append(message.id)

    def waiting_writers() -> int:
        row = db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE application_name = 'pgcg-writer' AND wait_event_type = 'Lock'"
        ).fetchone()
        return int(row["n"])  # type: ignore[index]

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    consumer.writer.round_trip_bound = 1.0
    with psycopg.connect(dsn, autocommit=True) as locker:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            assign(db, GROUP, TOPIC, [0], consumer.member_id)
            await await_for(lambda: started == set(ids), 30, "every message running")
            with locker.transaction():
                # The results go in the ledger, which this lock holds: the round that
                # carries them gets no answer. The heartbeat never touches that table.
                locker.execute("LOCK TABLE pgcg.ledger IN ACCESS EXCLUSIVE MODE")
                release.set()
                given_up = await await_for(
                    lambda: [
                        r for r in actions(caplog, "db_retry") if "no answer" in r.getMessage()
                    ],
                    20,
                    "the unanswered round given up",
                )
                assert "no answer from PostgreSQL within 1s" in given_up[0].getMessage()
                # Given up again and again while the lock is held, each time after ending
                # the process of the round before: not one more left waiting each time.
                await await_for(
                    lambda: len([r for r in actions(caplog, "db_retry")
                                 if "no answer" in r.getMessage()]) >= 3,
                    30,
                    "three rounds given up",
                )  # fmt: skip
                assert waiting_writers() <= 1
                assert actions(caplog, "write_abandoned")
            await await_for(lambda: not unfinished_ids(db, GROUP), 30, "every result written")
            consumer.stop()
    assert sorted(handled) == sorted(ids)


def test_headers_are_strings_whatever_the_row_holds() -> None:
    """Headers reach a handler as strings; the common case (all strings already, as every
    traced message's are) is not copied."""
    assert reader._headers(None) == {} and reader._headers({}) == {}
    traced = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert reader._headers(traced) is traced
    assert reader._headers({"n": 1, "t": "x", "b": None}) == {"n": "1", "t": "x", "b": "None"}
    assert reader._headers('{"a": "b"}') == {"a": "b"}
