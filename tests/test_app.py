"""pgcg.App against a real PostgreSQL: several handlers in one process (each in its own
group, with its own concurrency and retry policy, one LISTEN connection between them),
embedded in the test's own asyncio loop with its coordinator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pydantic
import pytest

from pgcg import App, Message, PgcgError
from pgcg.shared import dlq
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import FAST_ENV, await_for, fast_settings, unfinished, wait_for

ROOT = Path(__file__).resolve().parent.parent


def settings(**overrides: Any) -> Settings:
    return fast_settings(
        {"drain_deadline": 2, "leader_timeout": 3, "retry_base": 0.01, "retry_max": 0.02},
        overrides,
    )


class Order(pydantic.BaseModel):
    order_id: int


def listeners(db: psycopg.Connection[Any]) -> int:
    row = db.execute(
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'pgcg-listener'"
    ).fetchone()
    assert row is not None
    return int(row["n"])


def members(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) AS n FROM pgcg.consumer_groups").fetchone()
    assert row is not None
    return int(row["n"])


@pytest.mark.anyio
async def test_two_handlers_run_together_each_with_its_own_policy(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    for topic in ("orders", "emails"):
        db.execute("SELECT pgcg.create_topic(%s, 2)", (topic,))
    app = App(dsn, settings=settings(), coordinator=True)
    billed: list[Order] = []
    sent: list[str] = []
    active = 0
    peak = 0
    pair = anyio.Event()

    @app.handler(topic="orders", group="billing", max_attempts=1)
    async def bill(message: Message[Order]) -> None:
        if message.payload.order_id < 0:
            raise RuntimeError("refunds are not billed")
        billed.append(message.payload)

    @app.handler(topic="emails", group="mailer", concurrency=2)
    async def mail(message: Message[str]) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 2:
            pair.set()
        with anyio.fail_after(20):  # the first two meet; the rest are past the gate
            await pair.wait()
        sent.append(message.payload)
        active -= 1

    async with app.running():
        assert members(db) == 2
        await await_for(lambda: listeners(db) == 1, what="one listener for both")
        enqueue_many_sync(db, "orders", [OutgoingMessage("a", {"order_id": 1}),
                                         OutgoingMessage("b", {"order_id": -1})])  # fmt: skip
        enqueue_many_sync(db, "emails", [OutgoingMessage(f"k{n}", f"m{n}") for n in range(6)])
        await await_for(lambda: len(sent) == 6 and billed == [Order(order_id=1)], 60,
                        "both handlers' messages")  # fmt: skip
        await await_for(lambda: unfinished(db, "billing") + unfinished(db, "mailer") == 0,
                        what="results written")  # fmt: skip
        assert listeners(db) == 1
    assert members(db) == 0  # both left their groups
    assert peak == 2
    (dead,) = dlq.list_dead(db, dlq.Filter(group="billing"))
    assert dead["attempts"] == 1 and dead["reason"].startswith("RuntimeError: refunds")


@pytest.mark.anyio
async def test_start_and_stop_are_safe_in_any_order(db: psycopg.Connection[Any], dsn: str) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 1)", ("orders",))
    app = App(dsn, settings=settings())

    @app.handler(topic="orders", group="billing")
    async def handle(message: Message[Any]) -> None:
        pass

    await app.stop()  # before start: nothing to do
    await app.start()  # returns at once: it was stopped
    assert members(db) == 0

    app = App(dsn, settings=settings())
    app.handler(topic="orders", group="billing")(handle)
    await app.start()
    assert members(db) == 1
    await app.stop()
    await app.stop()
    assert members(db) == 0


@pytest.mark.anyio
async def test_a_handler_that_cannot_start_fails_start(dsn: str) -> None:
    app = App(dsn, settings=settings())

    @app.handler(topic="nowhere", group="billing")
    async def handle(message: Message[Any]) -> None:
        pass

    with pytest.raises(PgcgError):
        await app.start()


def test_registration_is_checked_at_once() -> None:
    app = App("postgresql://unused", settings=settings())

    async def handle(message: Message[Any]) -> None:
        pass

    app.handler(topic="orders", group="billing")(handle)
    with pytest.raises(PgcgError, match="one handler per group"):
        app.handler(topic="orders", group="billing")(handle)
    with pytest.raises(PgcgError, match="concurrency"):
        app.handler(topic="orders", group="other", concurrency=0)
    with pytest.raises(PgcgError):
        app.handler(topic="bad name!", group="third")


def test_pgcg_worker_runs_an_app_until_sigterm(
    db: psycopg.Connection[Any], dsn: str, tmp_path: Path
) -> None:
    for topic in ("orders", "emails"):
        db.execute("SELECT pgcg.create_topic(%s, 2)", (topic,))
    db.execute("CREATE TABLE public.worker_seen (handler text, message_id bigint)")
    err = tmp_path / "worker.err"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgcg.shared.cli", "worker", "tests.worker_app:app"],
            cwd=ROOT,
            env={**os.environ, **FAST_ENV, "PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        orders = enqueue_many_sync(db, "orders", [OutgoingMessage("a", {"n": 1})])
        emails = enqueue_many_sync(db, "emails", [OutgoingMessage("b", "hi")])
        expected = {("bill", orders[0].id), ("mail", emails[0].id)}
        wait_for(lambda: seen(db) == expected, 60, "both handlers ran in the worker")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert members(db) == 0


def seen(db: psycopg.Connection[Any]) -> set[tuple[str, int]]:
    return {(r["handler"], r["message_id"]) for r in db.execute("SELECT * FROM worker_seen")}


def test_pgcg_worker_refuses_what_is_not_an_app(cli: Any, dsn: str) -> None:
    done = cli(dsn, "worker", "tests.worker_app:bill")
    assert done.exit_code == 2
    assert "not a pgcg.App" in done.stderr


@pytest.mark.anyio
async def test_transactional_handlers_share_one_pool(db: psycopg.Connection[Any], dsn: str) -> None:
    """Two groups of transactional handlers, four at once each: one pool of at most 8
    connections, 4 kept open (two pools would keep 4 each)."""
    for topic in ("orders", "emails"):
        db.execute("SELECT pgcg.create_topic(%s, 1)", (topic,))
    db.execute("CREATE TABLE public.app_tx (topic text, message_id bigint)")
    app = App(dsn, settings=settings(), coordinator=True)

    async def record(message: Message[Any], tx: Any) -> None:
        await tx.execute("INSERT INTO public.app_tx VALUES (%s, %s)", (message.topic, message.id))

    app.handler(topic="orders", group="billing", concurrency=4)(record)
    app.handler(topic="emails", group="mailer", concurrency=4)(record)
    async with app.running():
        (order,) = enqueue_many_sync(db, "orders", [OutgoingMessage("a", 1)])
        (email,) = enqueue_many_sync(db, "emails", [OutgoingMessage("b", 2)])
        expected = {("orders", order.id), ("emails", email.id)}
        await await_for(
            lambda: {(r["topic"], r["message_id"]) for r in db.execute("TABLE app_tx")} == expected,
            60,
            "both handled in their transactions",
        )
        row = db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'pgcg-handler-tx'"
        ).fetchone()
        assert row is not None and row["n"] == 4
