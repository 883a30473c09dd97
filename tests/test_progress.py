"""Progress of long handlers against a real PostgreSQL: reports show from other connections
(`in_flight_progress`, what `pgcg status` reads), each one moves the handler's deadline, and
a handler that stops reporting is cancelled as stuck and retried."""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.progress import in_flight_progress
from pgcg.consumer.service import Consumer
from pgcg.consumer.transactional import Transaction
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, fast_settings, owners, pending

pytestmark = pytest.mark.anyio

GROUP = "progress"
TOPIC = "jobs"


DEFAULTS: dict[str, Any] = {"retry_base": 0.05, "retry_max": 0.2}


def settings(**overrides: Any) -> Settings:
    return fast_settings(DEFAULTS, overrides)


def enqueue(db: psycopg.Connection[Any], *keys: str) -> list[int]:
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    done = enqueue_many_sync(db, TOPIC, [OutgoingMessage(k, {}) for k in keys])
    return [e.id for e in done]  # type: ignore[misc]


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


async def run_until_drained(db: psycopg.Connection[Any], consumer: Consumer, body: Any) -> None:
    """Run the consumer on the topic's one partition, then `body`, then until drained."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await body()
        await await_for(lambda: pending(db, TOPIC) == 0, 20, "the topic drained")
        consumer.stop()


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
async def test_progress_is_visible_from_another_connection(
    db: psycopg.Connection[Any], dsn: str, transactional: bool
) -> None:
    [message_id] = enqueue(db, "report-42")
    finish = anyio.Event()

    async def work(message: Message) -> None:
        await message.progress(40, "resizing")
        await message.progress(60, "uploading")  # within the throttle: written a bit later
        await finish.wait()

    async def plain(message: Message) -> None:
        await work(message)

    async def in_tx(message: Message, tx: Transaction) -> None:
        # The report is visible although this transaction has not committed.
        await tx.execute("CREATE TEMPORARY TABLE scratch (n int) ON COMMIT DROP")
        await work(message)

    visibility = 30.0
    consumer = Consumer(
        settings(visibility_timeout=visibility),
        group=GROUP, topic=TOPIC, handler=in_tx if transactional else plain, dsn=dsn,
    )  # fmt: skip

    async def observe() -> None:
        [first] = await await_for(lambda: in_flight_progress(db, GROUP), 10, "a progress row")
        assert first["percent"] in (40, 60)
        [row] = await await_for(
            lambda: [r for r in in_flight_progress(db, GROUP) if r["percent"] == 60],
            10,
            "the throttled report",
        )
        assert (row["message_id"], row["key"], row["text"], row["attempt"]) == (
            message_id, "report-42", "uploading", 1,
        )  # fmt: skip
        assert (row["member_id"], row["epoch"]) == (consumer.member_id, owners(db, GROUP)[0][1])
        # The report moved the row's deadline: visibility seconds after it (database clock).
        assert row["locked_until"] - row["reported_at"] == datetime.timedelta(seconds=visibility)
        assert row["overdue"] is False
        later = row["locked_until"] + datetime.timedelta(seconds=1)
        [pinned] = in_flight_progress(db, GROUP, now=later)
        assert pinned["overdue"] is True and pinned["deadline_in_s"] == -1.0
        finish.set()

    await run_until_drained(db, consumer, observe)
    assert in_flight_progress(db, GROUP) == []


async def test_a_sync_handler_reports_through_from_thread(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    enqueue(db, "sync")
    finish = threading.Event()

    def handler(message: Message) -> None:
        anyio.from_thread.run(message.progress, 50, "half")
        finish.wait(20)

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)

    async def observe() -> None:
        [row] = await await_for(lambda: in_flight_progress(db, GROUP), 10, "a progress row")
        assert (row["percent"], row["text"]) == (50, "half")
        finish.set()

    await run_until_drained(db, consumer, observe)


async def test_a_handler_that_stops_reporting_is_stuck(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg")
    _, stuck_id = enqueue(db, "slow", "stuck")
    done: list[tuple[str, int]] = []
    stuck_retried = anyio.Event()

    async def handler(message: Message) -> None:
        if message.key == "slow":
            # Runs, reporting all along, until the silent one beside it has been cancelled
            # as stuck and retried: longer than the visibility timeout, which only a
            # handler that stops reporting outlives. Past the deadline it fails, and the
            # test with it.
            with anyio.fail_after(30):
                step = 0
                while not stuck_retried.is_set():
                    await message.progress(min(step, 99), f"step {step}")
                    with anyio.move_on_after(0.2):  # the next report is due by then
                        await stuck_retried.wait()
                    step += 1
        elif message.attempt == 1:
            await message.progress(10, "then silence")
            await anyio.sleep_forever()
        else:
            stuck_retried.set()
        done.append((message.key, message.attempt))

    consumer = Consumer(
        settings(visibility_timeout=2.0), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn
    )

    async def nothing() -> None:
        pass

    await run_until_drained(db, consumer, nothing)
    assert sorted(done) == [("slow", 1), ("stuck", 2)]
    stuck = actions(caplog, "handler_stuck")
    assert [r.message_id for r in stuck] == [stuck_id]  # type: ignore[attr-defined]
    [retry] = actions(caplog, "message_retry")
    assert "handler stuck" in retry.getMessage() and "last progress 10%" in retry.getMessage()


async def test_a_stuck_handler_that_swallows_its_cancellation_leaves_the_next_one_alone(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog cancels a stuck handler through its worker's scope, which the worker
    keeps from one message to the next. A handler that swallows that cancellation and
    returns is handled, not stuck, and the worker goes on with the next message in a
    fresh scope (in the cancelled one, that message would be cancelled at its first
    await, with no result, and its key stuck)."""
    caplog.set_level(logging.INFO, logger="pgcg")
    enqueue(db, "swallows", "next")
    done: list[str] = []

    async def handler(message: Message) -> None:
        if message.key == "swallows":
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                # Ignores its cancellation and returns (any await in a cancelled scope
                # would raise it again).
                done.append(message.key)
                return
        await anyio.lowlevel.checkpoint()  # an await, which a cancelled scope would cancel
        done.append(message.key)

    # One worker: the message after the stuck one runs on the same worker.
    consumer = Consumer(
        settings(visibility_timeout=1.0, concurrency=1),
        group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
    )  # fmt: skip

    async def nothing() -> None:
        pass

    await run_until_drained(db, consumer, nothing)
    assert sorted(done) == ["next", "swallows"]
    assert len(actions(caplog, "handler_stuck")) == 0  # it returned: handled, not stuck


async def test_a_report_after_the_epoch_moved_is_fenced(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcg")
    [message_id] = enqueue(db, "k")
    go = anyio.Event()
    cancelled: list[int] = []

    async def handler(message: Message) -> None:
        await message.progress(10, "first")
        await go.wait()
        await message.progress(20, "after the epoch moved")
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(message.id)
            raise

    # Heartbeats 10 s apart: the consumer learns about the bump only from the fence.
    consumer = Consumer(
        settings(heartbeat_interval=10, session_timeout=30, drain_deadline=30),
        group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
        await consumer.joined.wait()
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: in_flight_progress(db, GROUP), 10, "the first report")
        epoch = owners(db, GROUP)[0][1]
        db.execute(
            "UPDATE pgcg.partition_assignments SET member_id = 'elsewhere', epoch = epoch + 1 "
            "WHERE group_name = %s",
            (GROUP,),
        )
        go.set()
        await await_for(lambda: cancelled, 10, "the handler cancelled by the fence")
        consumer.stop()
    [rejected] = actions(caplog, "progress_rejected")
    assert (rejected.partition, rejected.epoch) == (0, epoch)  # type: ignore[attr-defined]
    # A reporting delivery runs as a parked one: its reports go to its parked row.
    row = db.execute(
        "SELECT pk.progress FROM pgcg.parked AS pk JOIN pgcg.groups AS g ON g.id = pk.group_id "
        'WHERE g.group_name = %s AND pk."offset" * 1024 + pk.partition = %s',
        (GROUP, message_id),
    ).fetchone()
    assert row is not None and row["progress"]["percent"] == 10  # the late report never landed
    assert actions(caplog, "message_retry") == []  # no result written for a lost partition


async def test_progress_rejects_bad_input(db: psycopg.Connection[Any], dsn: str) -> None:
    enqueue(db, "k")
    errors: list[str] = []

    async def handler(message: Message) -> None:
        for bad in (-1, 101, "half", float("nan")):
            try:
                await message.progress(bad)  # type: ignore[arg-type]
            except Exception as exc:
                errors.append(str(exc))
        try:
            await message.progress(50, "nul \x00 byte")
        except Exception as exc:
            errors.append(str(exc))

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)

    async def nothing() -> None:
        pass

    await run_until_drained(db, consumer, nothing)
    assert len(errors) == 5
    assert all("0 to 100" in e for e in errors[:4]) and "NUL" in errors[4]


async def test_progress_outside_a_consumer_does_nothing() -> None:
    message = Message(1, TOPIC, 0, "k", {}, {}, 1, datetime.datetime.now(datetime.UTC))
    await message.progress(50, "unit tests call handlers directly")


async def test_a_report_after_the_handler_returned_does_nothing(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A task the handler left behind may report after the handler returned. The message
    is finished by then: the report neither fails nor parks the key, whose next message
    may be running (here it is the one reporting for its predecessor)."""
    enqueue(db, "same-key", "same-key")
    handled: list[Message] = []
    parking_after_late_report: list[bool] = []

    async def handler(message: Message) -> None:
        if handled:
            await handled[0].progress(50, "late")
            parking_after_late_report.append(consumer.writer.parking(0, message.key))
            with pytest.raises(Exception, match="0 to 100"):
                await handled[0].progress(101)  # still checked, for the caller's sake
        handled.append(message)

    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)

    async def nothing() -> None:
        pass

    await run_until_drained(db, consumer, nothing)
    assert [m.attempt for m in handled] == [1, 1]
    assert parking_after_late_report == [False]
