"""Transactional handlers against a real PostgreSQL.

A transactional handler's writes, its enqueues and the ack of its message commit in one
transaction fenced by the partition's epoch: forced hand-offs, a zombie that writes after
its epoch was bumped and a member SIGKILLed mid-handler never count a message twice, and
ending the transaction from the handler fails clearly without losing the message.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg.bench.cluster import Cluster
from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.consumer.transactional import Transaction
from pgcg.shared.errors import HandlerLoadError, HandlerMisuse
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests import tx_handlers
from tests.helpers import FAST_ENV, assign, await_for, fast_settings, owners, pending, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
GROUP = "eo"
TOPIC = "orders"
RECEIPTS = "receipts"
ALL = [0, 1, 2, 3]


DEFAULTS: dict[str, Any] = {"retry_base": 0.05, "retry_max": 0.2, "max_attempts": 5}


def settings(**overrides: Any) -> Settings:
    return fast_settings(DEFAULTS, overrides)


def setup(db: psycopg.Connection[Any], partitions: int = 4) -> None:
    db.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, partitions))
    db.execute("SELECT pgcg.create_topic(%s, %s)", (RECEIPTS, partitions))
    tx_handlers.create(db)


def produce(db: psycopg.Connection[Any], n: int, keys: int) -> list[int]:
    msgs = [OutgoingMessage(f"k{i % keys}", {"seq": i}) for i in range(n)]
    return [e.id for e in enqueue_many_sync(db, TOPIC, msgs)]  # type: ignore[misc]


@contextlib.asynccontextmanager
async def running(*consumers: Consumer) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for consumer in consumers:
            tg.start_soon(lambda c=consumer: c.run(install_signal_handlers=False))
        for consumer in consumers:
            await consumer.joined.wait()
        yield
        for consumer in consumers:
            consumer.stop()


async def move(dsn: str, partitions: list[int], member: str) -> None:
    """Force partitions onto a member (epoch + 1), off the event loop: the statement may
    wait for a handler's transaction that needs the loop to commit."""

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            assign(conn, GROUP, TOPIC, partitions, member)

    await anyio.to_thread.run_sync(run)


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


# -- exactly once under hand-offs ---------------------------------------------------------


class Counting:
    """Transactional: simulated work, then count the message and enqueue a receipt."""

    def __init__(self, work: float) -> None:
        self.work = work
        self.calls = 0
        self.working: collections.Counter[str] = collections.Counter()  # member -> in a tx

    async def __call__(self, message: Message, tx: Transaction) -> None:
        self.calls += 1
        self.working[message.member_id] += 1
        try:
            await anyio.sleep(self.work)
        finally:
            self.working[message.member_id] -= 1
        await tx.execute(tx_handlers.INCREMENT)
        await tx.execute(
            tx_handlers.RECORD,
            (message.id, message.key, message.member_id, message.epoch, message.attempt, 0),
        )
        await tx.enqueue(RECEIPTS, message.key, {"for": message.id})


async def test_forced_handoffs_count_each_message_once(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db)
    ids = produce(db, 400, 40)
    handler = Counting(work=0.01)
    a, b = (
        Consumer(settings(concurrency=4), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
        for _ in range(2)
    )
    async with running(a, b):
        owner = a
        await move(dsn, ALL, owner.member_id)
        for _ in range(8):
            # Move every partition away while the owner is inside handlers' transactions.
            floor = tx_handlers.totals(db)["counter"] + 20
            await await_for(
                lambda o=owner, f=floor: (  # type: ignore[misc]
                    handler.working[o.member_id] > 0 and tx_handlers.totals(db)["counter"] >= f
                ),
                30,
                "the owner inside a handler, 20 messages after the last move",
            )
            owner = b if owner is a else a
            await move(dsn, ALL, owner.member_id)
        await await_for(lambda: pending(db, TOPIC) == 0, 60, "the topic drained")

    totals = tx_handlers.totals(db)
    assert totals == {"counter": len(ids), "handled": len(ids), "distinct_messages": len(ids)}
    receipts = db.execute(
        "SELECT count(*) AS n, count(DISTINCT payload->>'for') AS distinct_n "
        "FROM pgcg.log AS l JOIN pgcg.topics AS t "
        "ON l.slot BETWEEN t.id * 64 AND t.id * 64 + 63 WHERE t.name = %s",
        (RECEIPTS,),
    ).fetchone()
    assert receipts == {"n": len(ids), "distinct_n": len(ids)}
    # Work was cut short by the moves and rolled back, then done again by the new owner.
    assert handler.calls > len(ids)
    # Committed handlings keep each key's order.
    rows = db.execute("SELECT key, message_id FROM public.eo_handled ORDER BY seq").fetchall()
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for row in rows:
        by_key[row["key"]].append(row["message_id"])
    assert all(mids == sorted(mids) for mids in by_key.values())


async def test_zombie_write_after_epoch_bump_is_rejected(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg")
    setup(db, partitions=1)
    [message_id] = produce(db, 1, 1)
    inside, release = anyio.Event(), anyio.Event()
    calls: list[tuple[int, int]] = []

    async def handler(message: Message, tx: Transaction) -> None:
        calls.append((message.attempt, message.epoch))
        await tx.execute(tx_handlers.INCREMENT)
        await tx.execute(
            tx_handlers.RECORD,
            (message.id, message.key, message.member_id, message.epoch, message.attempt, 0),
        )
        if len(calls) == 1:
            inside.set()
            await release.wait()

    # Heartbeats 10 s apart: the consumer learns about the bump only from the fence.
    consumer = Consumer(
        settings(heartbeat_interval=10, session_timeout=30, drain_deadline=30),
        group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
    )  # fmt: skip
    async with running(consumer):
        await move(dsn, [0], consumer.member_id)
        await inside.wait()
        old_epoch = owners(db, GROUP)[0][1]
        # The coordinator's view moves on (no NOTIFY): the handler is now a zombie.
        db.execute(
            "UPDATE pgcg.partition_assignments SET epoch = epoch + 1 "
            "WHERE group_name = %s AND partition = 0",
            (GROUP,),
        )
        release.set()
        await await_for(lambda: actions(caplog, "ack_rejected"), 10, "the fence to reject")
        await await_for(lambda: pending(db, TOPIC) == 0, 20, "the message handled again")

    [rejected] = actions(caplog, "ack_rejected")
    assert (rejected.mode, rejected.epoch, rejected.message_id) == (  # type: ignore[attr-defined]
        "transactional",
        old_epoch,
        message_id,
    )
    rows = db.execute("SELECT epoch, attempt FROM public.eo_handled").fetchall()
    # The zombie's insert never landed; the second delivery's did, once.
    assert rows == [{"epoch": old_epoch + 1, "attempt": 2}]
    assert tx_handlers.totals(db)["counter"] == 1
    assert calls == [(1, old_epoch), (2, old_epoch + 1)]


# -- misuse -------------------------------------------------------------------------------

Misuse = Callable[[Transaction], Awaitable[Any]]


async def swallow_failed_statement(tx: Transaction) -> None:
    with contextlib.suppress(psycopg.errors.UndefinedTable):
        await tx.execute("SELECT * FROM public.no_such_table")


# name: (the misuse, what the error says, the counter afterwards)
MISUSES: dict[str, tuple[Misuse, str, int]] = {
    "tx.commit": (lambda tx: tx.commit(), "tx.commit() is not allowed", 1),
    "tx.rollback": (lambda tx: tx.rollback(), "tx.rollback() is not allowed", 1),
    "tx.close": (lambda tx: tx.close(), "tx.close() is not allowed", 1),
    "tx.set_autocommit": (lambda tx: tx.set_autocommit(True), "set_autocommit() is not", 1),
    "sql COMMIT": (lambda tx: tx.execute("COMMIT"), "executing COMMIT is not allowed", 1),
    "sql END": (lambda tx: tx.execute(" end"), "executing END is not allowed", 1),
    # Through SQL the driver cannot refuse: caught when the handler returns. What was
    # written before the COMMIT has been committed: the error says so.
    "hidden COMMIT": (
        lambda tx: tx.execute("SELECT 1; COMMIT"),
        "the handler ended the transaction pgcg opened",
        2,
    ),
    "hidden COMMIT; BEGIN": (
        lambda tx: tx.execute("SELECT 1; COMMIT; BEGIN"),
        "committed the transaction pgcg opened and began another",
        2,
    ),
    "swallowed error": (swallow_failed_statement, "the transaction is aborted", 1),
}


@pytest.mark.parametrize("name", list(MISUSES))
async def test_misuse_of_tx_fails_clearly_and_keeps_the_message(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg")
    misuse, says, counter = MISUSES[name]
    setup(db, partitions=1)
    [message_id] = produce(db, 1, 1)

    async def handler(message: Message, tx: Transaction) -> None:
        await tx.execute(tx_handlers.INCREMENT)
        if message.attempt == 1:
            await misuse(tx)
            return
        await tx.execute(
            tx_handlers.RECORD,
            (message.id, message.key, message.member_id, message.epoch, message.attempt, 0),
        )

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with running(consumer):
        await move(dsn, [0], consumer.member_id)
        await await_for(lambda: pending(db, TOPIC) == 0, 10, "handled on the retry")

    [retry] = actions(caplog, "message_retry")
    assert retry.message_id == message_id  # type: ignore[attr-defined]
    assert "HandlerMisuse" in retry.getMessage() and says in retry.getMessage()
    [misused] = actions(caplog, "handler_misuse")
    assert misused.levelno == logging.ERROR and says in misused.getMessage()
    # Handled once on the retry, not lost.
    rows = db.execute("SELECT message_id, attempt FROM public.eo_handled").fetchall()
    assert rows == [{"message_id": message_id, "attempt": 2}]
    assert tx_handlers.totals(db)["counter"] == counter


async def test_tx_is_unusable_after_the_handler_returned(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db, partitions=1)
    produce(db, 1, 1)
    kept: list[Transaction] = []

    async def handler(message: Message, tx: Transaction) -> None:
        kept.append(tx)

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with running(consumer):
        await move(dsn, [0], consumer.member_id)
        await await_for(lambda: pending(db, TOPIC) == 0, 10, "handled")
        with pytest.raises(HandlerMisuse, match="use tx only inside the handler call"):
            await kept[0].execute("SELECT 1")


def test_a_sync_transactional_handler_is_refused(dsn: str) -> None:
    def handler(message: Message, tx: Transaction) -> None:
        pass

    with pytest.raises(HandlerLoadError, match="async def handle"):
        Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)


# -- real processes -----------------------------------------------------------------------


def _in_transaction(db: psycopg.Connection[Any], pid: int) -> int | None:
    """A message the process is handling inside a transaction that began under 40 ms ago,
    so its 300 ms of work is far from done when the process is killed."""
    row = db.execute(
        "SELECT application_name FROM pg_stat_activity "
        "WHERE application_name LIKE %s AND state = 'idle in transaction' "
        "  AND clock_timestamp() - xact_start < interval '40 milliseconds' "
        "ORDER BY xact_start DESC LIMIT 1",
        (f"eo-tx-{pid}-%",),
    ).fetchone()
    return int(row["application_name"].rsplit("-", 1)[1]) if row else None


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_mid_handler_counts_each_message_once(
    db: psycopg.Connection[Any], dsn: str, tmp_path: Path
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 8)", (TOPIC,))
    tx_handlers.create(db)
    ids = produce(db, 240, 48)
    env = {
        **FAST_ENV,
        "PGCG_RETRY_BASE": "0.05",
        "PGCG_RETRY_MAX": "0.5",
        "PGCG_CONCURRENCY": "4",
        tx_handlers.WORK_ENV: "300",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    handler = "tests.tx_handlers:count"
    with Cluster(dsn, tmp_path, env=env) as cluster:
        cluster.coordinator(name="coord")
        c1 = cluster.consumer(GROUP, TOPIC, handler, name="c1")
        c2 = cluster.consumer(GROUP, TOPIC, handler, name="c2")
        killed_message = wait_for(lambda: _in_transaction(db, c1.pid), 60, "c1 mid-handler")
        c1.kill()
        # A member joins while c1's partitions move: hand-offs on top of the crash.
        cluster.consumer(GROUP, TOPIC, handler, name="c3")
        wait_for(lambda: pending(db, TOPIC) == 0, 120, "the topic drained")
        assert c2.alive

    totals = tx_handlers.totals(db)
    assert totals == {"counter": len(ids), "handled": len(ids), "distinct_messages": len(ids)}
    rows = db.execute(
        "SELECT attempt, pid FROM public.eo_handled WHERE message_id = %s", (killed_message,)
    ).fetchall()
    # The handling c1 was killed in never committed; another member's did, once.
    assert len(rows) == 1 and rows[0]["attempt"] >= 2 and rows[0]["pid"] != c1.pid
