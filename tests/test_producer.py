"""The producer against a real PostgreSQL: bad input fails whole and writes nothing, dedup,
delay, the caller's transaction, id order; and `pgcg produce` from the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from pgcg.shared.db import open_pool
from pgcg.shared.errors import InvalidInput, InvalidName, PayloadTooLarge, UnknownTopic
from pgcg.shared.producer import OutgoingMessage, Producer, enqueue_many_sync
from tests.helpers import pending

TOPIC = "orders"


@pytest.fixture
def topic(db: psycopg.Connection[Any]) -> str:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    return TOPIC


def count(db: psycopg.Connection[Any]) -> int:
    return int(db.execute("SELECT count(*) AS n FROM pgcg.messages").fetchone()["n"])  # type: ignore[index]


# -- bad input: a specific error, nothing written --------------------------------------------

GOOD = OutgoingMessage("k", {"ok": True})


@pytest.mark.parametrize(
    ("bad", "error", "says"),
    [
        (OutgoingMessage("k", {1, 2}), InvalidInput, "not JSON-serialisable"),
        (OutgoingMessage("k", {"x": math.nan}), InvalidInput, "not JSON-serialisable"),
        (OutgoingMessage("k", [math.inf]), InvalidInput, "not JSON-serialisable"),
        (OutgoingMessage("k", object()), InvalidInput, "not JSON-serialisable"),
        (OutgoingMessage("k", "x" * 200), PayloadTooLarge, "over the limit of 100"),
        (OutgoingMessage("", 1), InvalidInput, "non-empty string"),
        (OutgoingMessage(None, 1), InvalidInput, "non-empty string"),  # type: ignore[arg-type]
        (OutgoingMessage("k" * 1025, 1), InvalidInput, "over 1024 characters"),
        (OutgoingMessage("k", 1, headers={"a": 1}), InvalidInput, "headers"),  # type: ignore[dict-item]
        (OutgoingMessage("k", 1, dedup_key=""), InvalidInput, "dedup key"),
        (OutgoingMessage("k", 1, delay=-1), InvalidInput, "delay"),
        (OutgoingMessage("k", 1, delay=math.inf), InvalidInput, "delay"),
        # PostgreSQL text and jsonb cannot hold NUL or lone surrogates: refused up front,
        # with the message's position, not as a driver error from the middle of the batch.
        (OutgoingMessage("a\x00b", 1), InvalidInput, "NUL"),
        (OutgoingMessage("k", {"s": "x\x00y"}), InvalidInput, "NUL"),
        (OutgoingMessage("k", {"x\x00": 1}), InvalidInput, "NUL"),
        (OutgoingMessage("k", 1, dedup_key="d\x00"), InvalidInput, "NUL"),
        (OutgoingMessage("k", 1, headers={"h": "v\x00"}), InvalidInput, "NUL"),
        (OutgoingMessage("\ud800", 1), InvalidInput, "surrogate"),
        (OutgoingMessage("k", ["\udfff"]), InvalidInput, "surrogate"),
    ],
    ids=lambda v: None if isinstance(v, OutgoingMessage | type) else str(v)[:20],
)
def test_bad_message_fails_the_whole_batch(
    db: psycopg.Connection[Any], topic: str, bad: OutgoingMessage, error: type, says: str
) -> None:
    batch = [GOOD, GOOD, bad, GOOD]
    with pytest.raises(error, match=says) as info:
        enqueue_many_sync(db, topic, batch, max_payload_bytes=100)
    assert type(info.value) is error
    assert "message 2" in str(info.value)
    assert count(db) == 0
    # alone, the same message fails the same way
    with pytest.raises(error):
        enqueue_many_sync(db, topic, [bad], max_payload_bytes=100)
    assert count(db) == 0


def test_payload_limit_is_inclusive(db: psycopg.Connection[Any], topic: str) -> None:
    assert enqueue_many_sync(db, topic, [OutgoingMessage("k", "x" * 98)], max_payload_bytes=100)
    with pytest.raises(PayloadTooLarge):
        enqueue_many_sync(db, topic, [OutgoingMessage("k", "x" * 99)], max_payload_bytes=100)
    assert count(db) == 1


def test_escapes_that_look_like_nul_are_fine(db: psycopg.Connection[Any], topic: str) -> None:
    """A literal backslash-u-0000 in a string is text, not a NUL: it must go through."""
    payload = {"s": "\\u0000", "emoji": "🔑", "\\u0000": "k"}
    (done,) = enqueue_many_sync(db, topic, [OutgoingMessage("ключ 🔑", payload)])
    row = db.execute("SELECT key, payload FROM pgcg.messages WHERE id = %s", (done.id,)).fetchone()
    assert row == {"key": "ключ 🔑", "payload": payload}


def test_unknown_topic(db: psycopg.Connection[Any]) -> None:
    with pytest.raises(UnknownTopic, match="pgcg topic create nope"):
        enqueue_many_sync(db, "nope", [GOOD])
    assert count(db) == 0


@pytest.mark.parametrize("name", ["Orders", "1orders", "or-ders", "", "x" * 41, "a b", "ö"])
def test_invalid_topic_name(db: psycopg.Connection[Any], name: str) -> None:
    with pytest.raises(InvalidName):
        enqueue_many_sync(db, name, [GOOD])
    assert count(db) == 0


def test_empty_batch(db: psycopg.Connection[Any], topic: str) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        enqueue_many_sync(db, topic, [])


# -- what gets written -----------------------------------------------------------------------


def test_batch_ids_increase_in_input_order(db: psycopg.Connection[Any], topic: str) -> None:
    msgs = [OutgoingMessage(f"key-{(i * 7919) % 97}", {"i": i}) for i in range(1000)]
    done = enqueue_many_sync(db, topic, msgs)
    ids = [e.id for e in done]
    assert all(i is not None for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    rows = db.execute("SELECT id, payload FROM pgcg.messages ORDER BY id").fetchall()
    assert [r["payload"]["i"] for r in rows] == list(range(1000))


def test_dedup_key_skips_while_the_first_is_pending(
    db: psycopg.Connection[Any], topic: str
) -> None:
    first, again = enqueue_many_sync(
        db,
        topic,
        [OutgoingMessage("k", 1, dedup_key="d"), OutgoingMessage("k", 2, dedup_key="d")],
    )
    assert first.id is not None
    assert again.id is None and again.partition == first.partition
    (later,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 3, dedup_key="d")])
    assert later.id is None
    # the dedup key is per ordering key, and unrelated to messages without one
    (other_key,) = enqueue_many_sync(db, topic, [OutgoingMessage("k2", 4, dedup_key="d")])
    (no_dedup,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 5)])
    assert other_key.id is not None and no_dedup.id is not None
    assert count(db) == 3
    row = db.execute("SELECT payload FROM pgcg.messages WHERE id = %s", (first.id,)).fetchone()
    assert row == {"payload": 1}
    # once the first is gone (handled), the same dedup key is accepted again
    db.execute("DELETE FROM pgcg.messages WHERE id = %s", (first.id,))
    (fresh,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 6, dedup_key="d")])
    assert fresh.id is not None and fresh.id > first.id


def test_delay_sets_available_at_in_the_future(db: psycopg.Connection[Any], topic: str) -> None:
    soon, later = enqueue_many_sync(
        db, topic, [OutgoingMessage("k", 1), OutgoingMessage("k", 2, delay=90.5)]
    )
    rows = {
        r["id"]: r["wait"]
        for r in db.execute(
            "SELECT id, extract(epoch FROM available_at - enqueued_at)::float8 AS wait "
            "FROM pgcg.messages"
        )
    }
    assert rows[soon.id] == 0
    assert rows[later.id] == pytest.approx(90.5, abs=0.001)


def test_headers_are_stored(db: psycopg.Connection[Any], topic: str) -> None:
    (done,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 1, headers={"trace": "abc"})])
    (plain,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 1)])
    rows = {r["id"]: r["headers"] for r in db.execute("SELECT id, headers FROM pgcg.messages")}
    # Another test module may have installed a tracer provider (once per process): then the
    # producer adds W3C trace context next to the user's headers, and nothing else.
    context = {"traceparent", "tracestate"}
    user = {i: {k: v for k, v in h.items() if k not in context} for i, h in rows.items()}
    assert user == {done.id: {"trace": "abc"}, plain.id: {}}


@pytest.mark.anyio
async def test_enqueue_commits_and_rolls_back_with_the_callers_transaction(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    producer = Producer()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        with pytest.raises(RuntimeError, match="caller failed"):
            async with conn.transaction():
                await conn.execute("CREATE TABLE orders_app (id int)")
                done = await producer.enqueue(topic, "k", {"n": 1}, conn=conn)
                assert done.id is not None
                assert count(db) == 0  # not visible outside the transaction yet
                raise RuntimeError("caller failed")
        assert count(db) == 0
        assert db.execute("SELECT to_regclass('orders_app') AS t").fetchone() == {"t": None}

        async with conn.transaction():
            await conn.execute("CREATE TABLE orders_app (id int)")
            kept = await producer.enqueue_many(
                topic, [OutgoingMessage("k", {"n": 2}), OutgoingMessage("j", {"n": 3})], conn=conn
            )
        assert [r["id"] for r in db.execute("SELECT id FROM pgcg.messages ORDER BY id")] == [
            e.id for e in kept
        ]


@pytest.mark.anyio
async def test_standalone_producer_with_a_pool(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    pool = await open_pool(dsn)
    async with pool:
        producer = Producer(pool, max_payload_bytes=50)
        done = await producer.enqueue(topic, "k", {"n": 1}, delay=1)
        with pytest.raises(PayloadTooLarge):
            await producer.enqueue(topic, "k", "y" * 60)
    assert done.id is not None
    assert count(db) == 1
    with pytest.raises(InvalidInput, match="conn="):
        await Producer().enqueue(topic, "k", 1)


# -- pgcg produce ----------------------------------------------------------------------------


def pgcg(
    dsn: str, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgcg.shared.cli", *args],
        input=stdin,
        env={**os.environ, "PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(done: Any, code: int, says: str) -> None:
    """A subprocess.CompletedProcess or a click Result: exit code, one line, no traceback."""
    if isinstance(done, subprocess.CompletedProcess):
        returncode = done.returncode
    else:
        returncode = done.exit_code
        assert isinstance(done.exception, SystemExit), done.exception  # not a crash
    assert returncode == code, done
    assert done.stderr.startswith("pgcg: error: "), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert says in done.stderr


def test_cli_produce_one_message(db: psycopg.Connection[Any], dsn: str, topic: str) -> None:
    done = pgcg(
        dsn, "produce", "--topic", topic, "--key", "customer-42", "--payload", '{"total": 10}',
        "--header", "trace=abc", "--dedup-key", "order-1", "--delay", "30",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    row = db.execute(
        "SELECT id, partition, key, payload, headers, dedup_key, available_at > now() AS later "
        "FROM pgcg.messages"
    ).fetchone()
    assert row == {
        "id": out["id"],
        "partition": out["partition"],
        "key": "customer-42",
        "payload": {"total": 10},
        "headers": {"trace": "abc"},
        "dedup_key": "order-1",
        "later": True,
    }


def test_cli_produce_json_lines(db: psycopg.Connection[Any], dsn: str, topic: str) -> None:
    lines = [json.dumps({"key": f"k{i % 3}", "payload": {"seq": i}}) for i in range(25)]
    lines.insert(5, "")  # blank lines are skipped
    lines.append(json.dumps({"key": "k0", "payload": 1, "dedup_key": "d", "headers": {"h": "v"}}))
    done = pgcg(
        dsn, "produce", "--topic", topic, "--batch-size", "7", stdin="\n".join(lines) + "\n"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"enqueued": 26}
    rows = db.execute("SELECT key, payload FROM pgcg.messages ORDER BY id").fetchall()
    assert [r["payload"] for r in rows[:25]] == [{"seq": i} for i in range(25)]


@pytest.mark.parametrize(
    ("bad_line", "code", "says"),
    [
        ("{not json", 2, "line 3 is not valid JSON"),
        ("[1, 2]", 2, "line 3: expected an object"),
        ('{"key": "k"}', 2, "line 3: expected an object"),
        ('{"key": "", "payload": 1}', 2, "message 2: the ordering key"),
        ('{"key": "k", "payload": 1, "headers": [1]}', 2, "headers"),
        ('{"key": "k", "payload": 1, "delay": "soon"}', 2, "delay"),
        ('{"key": "k", "payload": 1, "delay": [1]}', 2, "delay"),
        ('{"key": "k", "payload": "\\u0000"}', 2, "NUL"),
        ('{"key": "k", "payload": "\\ud800"}', 2, "surrogate"),
    ],
)
def test_cli_bad_json_line_writes_nothing_of_its_batch(
    db: psycopg.Connection[Any], dsn: str, topic: str, bad_line: str, code: int, says: str,
    cli: Any,
) -> None:  # fmt: skip
    lines = ['{"key": "a", "payload": 1}', '{"key": "b", "payload": 2}', bad_line]
    done = cli(dsn, "produce", "--topic", topic, stdin="\n".join(lines) + "\n")
    assert_one_line_error(done, code, says)
    assert done.stdout == ""
    assert pending(db, topic) == 0


def test_cli_bad_json_line_from_a_real_process(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    """What a user's terminal shows: one line on stderr, exit code 2, nothing written."""
    lines = ['{"key": "a", "payload": 1}', '{"key": "k", "payload": "\\u0000"}']
    done = pgcg(dsn, "produce", "--topic", topic, stdin="\n".join(lines) + "\n")
    assert_one_line_error(done, 2, "NUL")
    assert pending(db, topic) == 0


def test_cli_bad_line_keeps_earlier_batches(
    db: psycopg.Connection[Any], dsn: str, topic: str, cli: Any
) -> None:
    lines = [json.dumps({"key": "a", "payload": i}) for i in range(4)] + ["{oops"]
    done = cli(dsn, "produce", "--topic", topic, "--batch-size", "2", stdin="\n".join(lines))
    assert_one_line_error(done, 2, "line 5 is not valid JSON")
    assert pending(db, topic) == 4


def test_cli_produce_errors(db: psycopg.Connection[Any], dsn: str, topic: str, cli: Any) -> None:
    assert_one_line_error(
        cli(dsn, "produce", "--topic", topic, "--key", "k", "--payload", "{x"), 2, "--payload"
    )
    assert_one_line_error(
        cli(dsn, "produce", "--topic", "nope", "--key", "k", "--payload", "1"), 3, "nope"
    )
    assert_one_line_error(
        cli(dsn, "produce", "--topic", "No", "--key", "k", "--payload", "1"), 2, "topic name"
    )
    assert_one_line_error(
        cli(dsn, "produce", "--topic", topic, "--key", "k", "--payload", '"abcdef"',
            PGCG_MAX_PAYLOAD_BYTES="4"),
        2, "PGCG_MAX_PAYLOAD_BYTES",
    )  # fmt: skip
    assert_one_line_error(cli(dsn, "produce", "--topic", topic, "--key", "k"), 2, "--payload")
    assert pending(db, topic) == 0
