"""Bad usage, settings or input: one line on stderr and exit 2 (as the README promises),
never a database overflow, a crash on the first failure or a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest
from click.testing import Result
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import MAX_DELAY_SECONDS
from tests.helpers import assign, await_for, fast_settings, running, stored
from tests.logclient import logged

TOPIC = "orders"
Cli = Callable[..., Result]


def one_line_exit_2(result: Result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert needle in result.output, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("delay", ["1e300", "1e14", str(MAX_DELAY_SECONDS + 1)])
def test_produce_refuses_a_delay_the_database_cannot_hold(
    db: psycopg.Connection[Any], dsn: str, cli: Cli, delay: str
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    single = cli(dsn, "produce", "--topic", TOPIC, "--key", "k", "--payload", "{}",
                 "--delay", delay)  # fmt: skip
    one_line_exit_2(single, "over the limit of 315360000 s")
    lines = json.dumps({"key": "k", "payload": {}, "delay": float(delay)}) + "\n"
    one_line_exit_2(cli(dsn, "produce", "--topic", TOPIC, stdin=lines), "over the limit")
    assert stored(db, TOPIC) == 0


def test_the_longest_delay_is_accepted(db: psycopg.Connection[Any], dsn: str, cli: Cli) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    result = cli(dsn, "produce", "--topic", TOPIC, "--key", "k", "--payload", "{}",
                 "--delay", str(MAX_DELAY_SECONDS))  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = logged(db, TOPIC)
    assert row["available_at"] - row["enqueued_at"] == timedelta(seconds=MAX_DELAY_SECONDS)


@pytest.mark.parametrize("interval", ["-1", "0", "nan", "inf", "1e300"])
def test_status_watch_refuses_a_bad_interval(dsn: str, cli: Cli, interval: str) -> None:
    result = cli(dsn, "status", "--watch", "--interval", interval)
    one_line_exit_2(result, "--interval must be between 0 and 3600 seconds")


def test_retry_settings_are_bounded(cli: Cli) -> None:
    result = cli("postgresql://x", "consumer", "--group", "g", "--topic", "t", "--handler",
                 "pgcg.bench.chaos.journal:record", "--retry-base", "1e15", "--retry-max",
                 "1e15")  # fmt: skip
    one_line_exit_2(result, "invalid settings: retry_base: Input should be less than or equal")


@pytest.mark.anyio
async def test_a_consumer_at_the_longest_retry_survives_a_failure(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The largest retry settings allowed schedule a retry the database can hold."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    (sent,) = enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {})])
    failures: list[int] = []

    async def handle(message: Message) -> None:
        failures.append(message.attempt)
        raise RuntimeError("fails once, retried in years")

    settings = fast_settings({}, {"retry_base": MAX_DELAY_SECONDS, "retry_max": MAX_DELAY_SECONDS})
    consumer = Consumer(settings, group="g", topic=TOPIC, handler=handle, dsn=dsn)
    async with running(consumer):
        assign(db, "g", TOPIC, [0], consumer.member_id)

        def scheduled() -> bool:
            # A failed message waits for its retry in the group's parked queue.
            row = db.execute(
                "SELECT pk.attempts, pk.available_at > now() + interval '1 day' AS later "
                "FROM pgcg.parked AS pk JOIN pgcg.groups AS g ON g.id = pk.group_id "
                "WHERE g.group_name = 'g' AND pk.\"offset\" * 1024 + pk.partition = %s",
                (sent.id,),
            ).fetchone()
            return bool(row and row["attempts"] == 1 and row["later"])

        await await_for(scheduled, 20, "the retry scheduled far ahead")
        await anyio.lowlevel.checkpoint()
        assert consumer.joined.is_set() and failures == [1]


@pytest.mark.parametrize(
    "change",
    [
        {"sslmode": "bogus"},
        {"port": "abc"},
        {"target_session_attrs": "whatever"},
    ],
)
def test_a_malformed_connection_setting_is_exit_2(
    pg_server: str, cli: Cli, change: dict[str, str]
) -> None:
    params = conninfo_to_dict(pg_server)
    keyword_form = make_conninfo("", **{**params, **change})
    host, port = params["host"], params["port"]
    url_form = f"postgresql://postgres@{host}:{change.get('port', port)}/postgres" + "".join(
        f"?{k}={v}" for k, v in change.items() if k != "port"
    )
    for dsn in (keyword_form, url_form):
        result = cli(dsn, "status")
        one_line_exit_2(result, "PGCG_DATABASE_URL has a setting libpq refuses")
