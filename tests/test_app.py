"""pgcg.App against a real PostgreSQL: several handlers in one process (each in its own
group, with its own concurrency and retry policy; one heartbeat connection, one LISTEN
connection and one pool between them), embedded in the test's own asyncio loop with its
coordinator."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pydantic
import pytest
from psycopg.rows import dict_row

from pgcg import App, Message, PgcgError
from pgcg.shared import dlq
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import FAST_ENV, assign, await_for, fast_settings, unfinished, wait_for

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


def heartbeat_backends(db: psycopg.Connection[Any]) -> list[tuple[str, int]]:
    """(application_name, pid) of the connections members heartbeat on."""
    rows = db.execute(
        "SELECT application_name AS name, pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'pgcg-member:%' "
        "ORDER BY pid"
    ).fetchall()
    return [(r["name"], r["pid"]) for r in rows]


def last_heartbeats(db: psycopg.Connection[Any]) -> set[Any]:
    return {r["t"] for r in db.execute("SELECT last_heartbeat AS t FROM pgcg.consumer_groups")}


def one_heartbeat(db: psycopg.Connection[Any], other_than: Any = None) -> Any:
    """The members' last_heartbeat once it is one value for all (and not `other_than`)."""
    beats = last_heartbeats(db)
    return len(beats) == 1 and beats != other_than and beats


def heartbeat_pid(db: psycopg.Connection[Any]) -> int | None:
    """The pid of the one heartbeat connection, or None while there is not exactly one."""
    backends = heartbeat_backends(db)
    return backends[0][1] if len(backends) == 1 else None


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


def groups_of(caplog: pytest.LogCaptureFixture, action: str) -> set[str]:
    return {getattr(r, "group", "") for r in actions(caplog, action)}


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
    port = free_port()
    env = {**os.environ, **FAST_ENV, "PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json",
           "PGCG_HTTP_PORT": str(port)}  # fmt: skip
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgcg.shared.cli", "worker", "tests.worker_app:app"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        orders = enqueue_many_sync(db, "orders", [OutgoingMessage("a", {"n": 1})])
        emails = enqueue_many_sync(db, "emails", [OutgoingMessage("b", "hi")])
        expected = {("bill", orders[0].id), ("mail", emails[0].id)}
        wait_for(lambda: seen(db) == expected, 60, "both handlers ran in the worker")
        # Each group observed as `pgcg consumer` observes its one: gauges by group, and
        # ready once each handler holds its share of its group's partitions.
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, 30, "the worker ready")
        body = http_get(f"{base}/readyz")[1]
        assert "of group billing, 2 partition(s)" in body, body
        assert "of group mailer, 2 partition(s)" in body, body
        status, text = http_get(f"{base}/metrics")
        assert status == 200
        for group in ("billing", "mailer"):
            for gauge in ("pgcg_consumer_partitions", "pgcg_consumer_heartbeat_age_seconds"):
                assert f'{gauge}{{messaging_consumer_group_name="{group}"' in text, (gauge, group)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert members(db) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening yet
        return 0, str(exc)


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


@pytest.mark.anyio
async def test_the_handlers_share_one_heartbeat_round_trip_and_one_listener(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Two handlers, two members, one heartbeat connection: each interval one statement
    renews both (their last_heartbeat is the same transaction's now())."""
    for topic in ("orders", "emails"):
        db.execute("SELECT pgcg.create_topic(%s, 1)", (topic,))
    app = App(dsn, settings=settings())

    async def handle(message: Message[Any]) -> None:
        pass

    app.handler(topic="orders", group="billing")(handle)
    app.handler(topic="emails", group="mailer")(handle)
    async with app.running():
        await await_for(
            lambda: [n for n, _ in heartbeat_backends(db)] == ["pgcg-member:billing,mailer"],
            what="one heartbeat connection for both members",
        )
        await await_for(lambda: listeners(db) == 1, what="one listener for both")
        first = await await_for(lambda: one_heartbeat(db), what="both renewed by one statement")
        # And again on the next beat: not one statement that happened to renew both once.
        await await_for(lambda: one_heartbeat(db, first), what="the next one renewing both")
        assert members(db) == 2
        # Expelling one member concerns that one alone: it rejoins, the other goes on.
        billing, mailer = app.consumers
        expelled, kept = billing.member_id, mailer.member_id
        db.execute("DELETE FROM pgcg.consumer_groups WHERE member_id = %s", (expelled,))
        await await_for(
            lambda: billing.member_id != expelled and billing.ctx.membership.in_group,
            30,
            "the expelled member to rejoin",
        )
        assert mailer.member_id == kept and mailer.ctx.membership.lease.valid()
        await await_for(lambda: one_heartbeat(db), what="both renewed by one statement again")
        assert [n for n, _ in heartbeat_backends(db)] == ["pgcg-member:billing,mailer"]
    assert members(db) == 0


@pytest.mark.anyio
async def test_a_killed_heartbeat_connection_fences_every_member_until_it_is_back(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The shared heartbeat is every member's: killing its connection is a failed
    heartbeat for each one. A short loss is made good by the next round trip on a new
    connection (nobody loses anything); a loss longer than the lease makes every member
    self-fence on its own lease, and rejoin once it was expelled."""
    caplog.set_level(logging.INFO, logger="pgcg")
    for topic in ("orders", "emails"):
        db.execute("SELECT pgcg.create_topic(%s, 2)", (topic,))
    app = App(dsn, settings=settings())  # no coordinator: the test assigns and expels
    handled: list[tuple[str, str]] = []

    @app.handler(topic="orders", group="billing")
    async def bill(message: Message[Any]) -> None:
        handled.append(("billing", message.key))

    @app.handler(topic="emails", group="mailer")
    async def mail(message: Message[Any]) -> None:
        handled.append(("mailer", message.key))

    def kill_heartbeat() -> None:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'pgcg-member:%'"
        )

    async with app.running():
        consumers = app.consumers

        async def give_partitions() -> None:
            for c in consumers:
                assign(db, c.ctx.group, c.ctx.topic, [0, 1], c.member_id)
            await await_for(
                lambda: all(len(c.ctx.assignment.owned) == 2 for c in consumers),
                30,
                "each member to own its two partitions",
            )

        await give_partitions()
        before = await await_for(lambda: heartbeat_pid(db), what="the heartbeat connection")
        first_ids = [c.member_id for c in consumers]

        # A short loss: every member hears of it; one new connection renews them all.
        kill_heartbeat()
        await await_for(
            lambda: groups_of(caplog, "heartbeat_failed") == {"billing", "mailer"},
            30,
            "each member to hear that its heartbeat failed",
        )
        await await_for(
            lambda: heartbeat_pid(db) not in (None, before), 30, "a new heartbeat connection"
        )
        assert [c.member_id for c in consumers] == first_ids
        assert all(len(c.ctx.assignment.owned) == 2 for c in consumers)
        assert not actions(caplog, "lease_expired")

        # A loss longer than the lease: the member rows are held, so no heartbeat gets
        # through on the connections made after the kill either.
        with psycopg.connect(dsn, row_factory=dict_row) as blocker:
            blocker.execute("SELECT member_id FROM pgcg.consumer_groups FOR UPDATE").fetchall()
            kill_heartbeat()
            await await_for(
                lambda: groups_of(caplog, "lease_expired") == {"billing", "mailer"},
                30,
                "every member to self-fence when its lease ran out",
            )
            assert all(not c.ctx.assignment.owned for c in consumers)
            assert all(not c.ctx.membership.lease.valid() for c in consumers)
            # What the coordinator does with members silent for their session timeout.
            blocker.execute(
                "DELETE FROM pgcg.consumer_groups WHERE member_id = ANY(%s)", (first_ids,)
            )
        await await_for(
            lambda: all(
                c.member_id not in first_ids and c.ctx.membership.in_group for c in consumers
            ),
            30,
            "every member to rejoin",
        )
        assert groups_of(caplog, "member_expelled") == {"billing", "mailer"}
        assert members(db) == 2
        await give_partitions()
        enqueue_many_sync(db, "orders", [OutgoingMessage("a", 1)])
        enqueue_many_sync(db, "emails", [OutgoingMessage("b", 2)])
        await await_for(
            lambda: sorted(handled) == [("billing", "a"), ("mailer", "b")],
            30,
            "both handlers to work again",
        )
        # The round trips cut off while the rows were held end with the lock.
        await await_for(lambda: heartbeat_pid(db), 30, "one heartbeat connection again")
