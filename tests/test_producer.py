"""The producer against a real PostgreSQL: bad input fails whole and writes nothing, the
limits (in Python and in SQL, for every language), the dedup window, delay, the caller's
transaction, per-partition order, one write per message; and `pgcg produce` from the
command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from pgcg.shared.db import open_pool
from pgcg.shared.errors import InvalidInput, InvalidName, PayloadTooLarge, UnknownTopic
from pgcg.shared.producer import (
    MAX_DEDUP_KEY_BYTES,
    MAX_HEADERS_BYTES,
    MAX_KEY_BYTES,
    OutgoingMessage,
    Producer,
    enqueue_many_sync,
)
from pgcg.shared.settings import MAX_DELAY_SECONDS
from tests.helpers import pending
from tests.logclient import logged

TOPIC = "orders"


@pytest.fixture
def topic(db: psycopg.Connection[Any]) -> str:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    return TOPIC


def count(db: psycopg.Connection[Any]) -> int:
    """Messages in every topic's log."""
    return int(db.execute("SELECT count(*) AS n FROM pgcg.log").fetchone()["n"])  # type: ignore[index]


def digests(db: psycopg.Connection[Any]) -> int:
    """Dedup keys claimed for their window."""
    return int(db.execute("SELECT count(*) AS n FROM pgcg.dedup").fetchone()["n"])  # type: ignore[index]


def by_id(db: psycopg.Connection[Any], topic: str) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in logged(db, topic)}


# -- bad input: a specific error, nothing written --------------------------------------------

GOOD = OutgoingMessage("k", {"ok": True})
# A failed call must not claim its dedup keys: the fixed retry would be swallowed.
DEDUPED = OutgoingMessage("k", {"ok": True}, dedup_key="once")


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
        (
            OutgoingMessage("k" * 1025, 1),
            InvalidInput,
            "1025 bytes in UTF-8, over the limit of 1024",
        ),
        # bytes, not characters: 513 characters, 1026 bytes
        (
            OutgoingMessage("é" * 513, 1),
            InvalidInput,
            "1026 bytes in UTF-8, over the limit of 1024",
        ),
        (OutgoingMessage("k", 1, dedup_key="é" * 257), InvalidInput, "dedup key is 514 bytes"),
        (
            OutgoingMessage("k", 1, headers={"h": "x" * 65536}),
            InvalidInput,
            "over the limit of 65536",
        ),
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
    batch = [GOOD, DEDUPED, bad, GOOD]
    with pytest.raises(error, match=says) as info:
        enqueue_many_sync(db, topic, batch, max_payload_bytes=100)
    assert type(info.value) is error
    assert "message 2" in str(info.value)
    assert count(db) == 0 and digests(db) == 0
    # alone, the same message fails the same way
    with pytest.raises(error):
        enqueue_many_sync(db, topic, [bad], max_payload_bytes=100)
    assert count(db) == 0


def test_payload_limit_is_inclusive(db: psycopg.Connection[Any], topic: str) -> None:
    assert enqueue_many_sync(db, topic, [OutgoingMessage("k", "x" * 98)], max_payload_bytes=100)
    with pytest.raises(PayloadTooLarge):
        enqueue_many_sync(db, topic, [OutgoingMessage("k", "x" * 99)], max_payload_bytes=100)
    assert count(db) == 1


def test_key_limits_are_in_utf8_bytes_and_inclusive(
    db: psycopg.Connection[Any], topic: str
) -> None:
    """The longest key and dedup key go through, counted in UTF-8 bytes. (Headers at their
    limit: see the SQL test below; here a tracer may add its context to them.)"""
    longest = OutgoingMessage(
        "é" * (MAX_KEY_BYTES // 2), 1, dedup_key="🔑" * (MAX_DEDUP_KEY_BYTES // 4)
    )
    (done,) = enqueue_many_sync(db, topic, [longest])
    row = by_id(db, topic)[done.id]  # type: ignore[index]
    assert row["key"] == longest.key and row["dedup_key"] == longest.dedup_key


@pytest.mark.pg15  # pgcg.enqueue's SQL, on both versions
def test_the_limits_python_checks_are_the_ones_the_database_enforces(
    db: psycopg.Connection[Any],
) -> None:
    row = db.execute(
        "SELECT pgcg.max_key_bytes() AS key, pgcg.max_dedup_key_bytes() AS dedup, "
        "pgcg.max_headers_bytes() AS headers, pgcg.max_delay_ms() AS delay_ms"
    ).fetchone()
    assert row == {
        "key": MAX_KEY_BYTES,
        "dedup": MAX_DEDUP_KEY_BYTES,
        "headers": MAX_HEADERS_BYTES,
        "delay_ms": MAX_DELAY_SECONDS * 1000,
    }


def sql_enqueue(
    db: psycopg.Connection[Any],
    topic: str,
    messages: list[tuple[str, Any, dict[str, str] | None, str | None, int | None]],
) -> list[dict[str, Any]]:
    """pgcg.enqueue as a producer in another language calls it: (key, payload, headers,
    dedup key, delay in ms) per message."""
    return db.execute(
        "SELECT ord, id, partition FROM pgcg.enqueue(%s, %s::text[], %s::text[]::jsonb[], "
        "%s::text[]::jsonb[], %s::text[], %s::bigint[])",
        (
            topic,
            [m[0] for m in messages],
            [json.dumps(m[1]) for m in messages],
            [None if m[2] is None else json.dumps(m[2]) for m in messages],
            [m[3] for m in messages],
            [m[4] for m in messages],
        ),
    ).fetchall()


@pytest.mark.pg15  # pgcg.enqueue's SQL, on both versions
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (("é" * 513, 1, None, None, None), "the ordering key is 1026 bytes in UTF-8, over the "
         "limit of 1024"),
        (("", 1, None, None, None), "the ordering key must be a non-empty string"),
        (("k", 1, None, "é" * 257, None), "the dedup key is 514 bytes in UTF-8, over the limit "
         "of 512"),
        (("k", 1, None, "", None), "a dedup key must be a non-empty string"),
        (("k", 1, {"h": "x" * 65536}, None, None), "the headers are 65545 bytes, over "
         "the limit of 65536"),
        (("k", 1, {"h": 1}, None, None), "headers must be a JSON object of strings"),
        (("k", "x" * 1_048_576, None, None, None), "the payload is 1048578 bytes, "
         "over the topic's limit of 1048576"),
        (("k", 1, None, None, MAX_DELAY_SECONDS * 1000 + 1), "the delay must be between 0 and "
         "315360000000 ms"),
        (("k", 1, None, None, -1), "the delay must be between 0 and"),
    ],
    ids=["key-bytes", "key-empty", "dedup-bytes", "dedup-empty", "headers-size", "headers-type",
         "payload", "delay-long", "delay-negative"],
)  # fmt: skip
def test_the_database_enforces_the_limits_for_every_language(
    db: psycopg.Connection[Any], topic: str, bad: Any, says: str
) -> None:
    """pgcg.enqueue refuses what the Python producer refuses, whole, with the message's
    position, and claims no dedup key of the failed call."""
    good = ("k", 1, None, "once", None)
    with pytest.raises(psycopg.Error, match=f"message 1: {says}") as info:
        sql_enqueue(db, topic, [good, bad])
    assert info.value.sqlstate == "PGC03"
    assert count(db) == 0 and digests(db) == 0


@pytest.mark.pg15  # pgcg.enqueue's SQL, on both versions
def test_the_database_accepts_what_is_at_the_limits(
    db: psycopg.Connection[Any], topic: str
) -> None:
    longest = [
        ("é" * 512, 1, None, "é" * 256, MAX_DELAY_SECONDS * 1000),
        ("k", "x" * (1_048_576 - 2), {"h": "x" * (MAX_HEADERS_BYTES - len('{"h": ""}'))}, None, 0),
    ]
    rows = sql_enqueue(db, topic, longest)
    assert all(r["id"] is not None for r in rows)
    stored = by_id(db, topic)
    first, second = (stored[r["id"]] for r in rows)
    assert first["key"] == "é" * 512 and first["dedup_key"] == "é" * 256
    assert first["available_at"] - first["enqueued_at"] == timedelta(seconds=MAX_DELAY_SECONDS)
    assert second["available_at"] is None


def test_escapes_that_look_like_nul_are_fine(db: psycopg.Connection[Any], topic: str) -> None:
    """A literal backslash-u-0000 in a string is text, not a NUL: it must go through."""
    payload = {"s": "\\u0000", "emoji": "🔑", "\\u0000": "k"}
    (done,) = enqueue_many_sync(db, topic, [OutgoingMessage("ключ 🔑", payload)])
    row = by_id(db, topic)[done.id]  # type: ignore[index]
    assert (row["key"], row["payload"]) == ("ключ 🔑", payload)


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


@pytest.mark.pg15  # pgcg.enqueue's SQL, on both versions
def test_a_batch_keeps_its_order_in_each_partition(db: psycopg.Connection[Any], topic: str) -> None:
    """A message is (topic, partition, offset): offsets follow input order within each
    partition (so each key's messages keep their order), ids are unique and name them."""
    msgs = [OutgoingMessage(f"key-{(i * 7919) % 97}", {"i": i}) for i in range(1000)]
    done = enqueue_many_sync(db, topic, msgs)
    ids = [e.id for e in done]
    assert all(i is not None for i in ids) and len(set(ids)) == len(ids)
    rows = logged(db, topic)
    assert {r["id"]: r["payload"]["i"] for r in rows} == {e.id: i for i, e in enumerate(done)}
    for part in range(4):
        in_log = [r["payload"]["i"] for r in rows if r["partition"] == part]
        assert in_log == [i for i, e in enumerate(done) if e.partition == part]
        assert in_log, "every partition got some"
    assert all(r["id"] == r["offset"] * 1024 + r["partition"] for r in rows)


@pytest.mark.pg15  # pgcg.enqueue's SQL, on both versions
def test_dedup_key_skips_within_the_window(db: psycopg.Connection[Any], topic: str) -> None:
    """A producer retrying after a lost commit reply creates no duplicate: the same key and
    dedup key are skipped for the topic's dedup window (5 minutes by default), handled or
    not, and accepted again once it has passed."""
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
    stored = by_id(db, topic)
    assert stored[first.id]["payload"] == 1  # type: ignore[index]
    # the window runs from the first enqueue, whatever happens to the message
    windows = db.execute(
        "SELECT d.expires_at FROM pgcg.dedup AS d JOIN pgcg.topics AS t ON t.id = d.topic_id "
        "WHERE t.name = %s",
        (topic,),
    ).fetchall()
    enqueued_at = stored[first.id]["enqueued_at"]  # type: ignore[index]
    assert len(windows) == 2  # (k, d) and (k2, d)
    assert min(w["expires_at"] for w in windows) - enqueued_at == timedelta(minutes=5)
    # once the window has passed, the same dedup key is accepted again (a new message)
    db.execute("UPDATE pgcg.dedup SET expires_at = now() - interval '1 millisecond'")
    (fresh,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 6, dedup_key="d")])
    assert fresh.id is not None and fresh.partition == first.partition
    assert by_id(db, topic)[fresh.id]["offset"] > stored[first.id]["offset"]  # type: ignore[index]
    (skipped,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 7, dedup_key="d")])
    assert skipped.id is None and count(db) == 4


@pytest.mark.pg15  # pgcg.enqueue's SQL, on both versions
def test_the_dedup_window_is_the_topics(db: psycopg.Connection[Any], topic: str) -> None:
    db.execute("SELECT pgcg.alter_topic(%s, p_dedup_window_ms => 0)", (topic,))
    twice = [OutgoingMessage("k", 1, dedup_key="d")]
    first, again = (enqueue_many_sync(db, topic, twice)[0] for _ in range(2))
    assert first.id is not None and again.id is not None and count(db) == 2


def test_delay_sets_available_at_in_the_future(db: psycopg.Connection[Any], topic: str) -> None:
    soon, later = enqueue_many_sync(
        db, topic, [OutgoingMessage("k", 1), OutgoingMessage("k", 2, delay=90.5)]
    )
    rows = by_id(db, topic)
    assert rows[soon.id]["available_at"] is None  # type: ignore[index]  # at once
    row = rows[later.id]  # type: ignore[index]
    assert row["available_at"] - row["enqueued_at"] == timedelta(seconds=90.5)


def test_headers_are_stored(db: psycopg.Connection[Any], topic: str) -> None:
    (done,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 1, headers={"trace": "abc"})])
    (plain,) = enqueue_many_sync(db, topic, [OutgoingMessage("k", 1)])
    rows = {i: r["headers"] or {} for i, r in by_id(db, topic).items()}
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
                await producer.enqueue(topic, "k", {"n": 1}, dedup_key="d", conn=conn)
                assert count(db) == 0  # not visible outside the transaction yet
                raise RuntimeError("caller failed")
        assert count(db) == 0 and digests(db) == 0
        assert db.execute("SELECT to_regclass('orders_app') AS t").fetchone() == {"t": None}
        # the rolled-back dedup key does not swallow the caller's retry
        async with conn.transaction():
            retried = await producer.enqueue(topic, "k", {"n": 1}, dedup_key="d", conn=conn)
        assert retried.id is not None and count(db) == 1

        async with conn.transaction():
            await conn.execute("CREATE TABLE orders_app (id int)")
            kept = await producer.enqueue_many(
                topic, [OutgoingMessage("k", {"n": 2}), OutgoingMessage("j", {"n": 3})], conn=conn
            )
        assert set(by_id(db, topic)) == {retried.id} | {e.id for e in kept}


@pytest.mark.pg15  # pgcg.enqueue's SQL, on both versions
@pytest.mark.parametrize("groups", [0, 3])
def test_one_write_per_message_whatever_the_number_of_groups(
    db: psycopg.Connection[Any], dsn: str, topic: str, groups: int
) -> None:
    """An enqueue writes each message once (plus its dedup digest, if any), however many
    groups read the topic: every group reads the same log."""
    for n in range(groups):
        db.execute("SELECT pgcg.create_group(%s, %s)", (f"g{n}", topic))
    msgs = [OutgoingMessage(f"k{i}", {"i": i}) for i in range(20)]
    msgs += [OutgoingMessage(f"k{i}", {"i": i}, dedup_key=f"d{i}") for i in range(5)]
    with psycopg.connect(dsn) as conn, conn.transaction():
        enqueue_many_sync(conn, topic, msgs)
        # This transaction's own row changes, per table (leaf partitions included).
        written = conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_all_tables "
            "WHERE schemaname = 'pgcg' AND n_tup_ins + n_tup_upd + n_tup_del > 0"
        ).fetchall()
    inserts = {name: ins for name, ins, _, _ in written}
    assert sum(upd + dele for _, _, upd, dele in written) == 0
    assert inserts.pop("dedup") == 5
    assert list(inserts.values()) == [25], inserts  # one log slot table
    assert next(iter(inserts)).startswith(f"log_{topic}")


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
    (row,) = logged(db, topic)
    assert {k: row[k] for k in ("id", "partition", "key", "payload", "headers", "dedup_key")} == {
        "id": out["id"],
        "partition": out["partition"],
        "key": "customer-42",
        "payload": {"total": 10},
        "headers": {"trace": "abc"},
        "dedup_key": "order-1",
    }
    assert row["available_at"] - row["enqueued_at"] == timedelta(seconds=30)


def test_cli_produce_json_lines(db: psycopg.Connection[Any], dsn: str, topic: str) -> None:
    lines = [json.dumps({"key": f"k{i % 3}", "payload": {"seq": i}}) for i in range(25)]
    lines.insert(5, "")  # blank lines are skipped
    lines.append(json.dumps({"key": "k0", "payload": 1, "dedup_key": "d", "headers": {"h": "v"}}))
    done = pgcg(
        dsn, "produce", "--topic", topic, "--batch-size", "7", stdin="\n".join(lines) + "\n"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"enqueued": 26}
    rows = logged(db, topic)
    assert len(rows) == 26
    for key in ("k0", "k1", "k2"):  # each key's lines in their order, across batches
        seqs = [r["payload"]["seq"] for r in rows if r["key"] == key and r["payload"] != 1]
        assert seqs == [i for i in range(25) if f"k{i % 3}" == key]


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
