"""The partition of a key: pgcg.partition_for in SQL equals the documented reference, and
enqueue stores each message in exactly that partition."""

from __future__ import annotations

from typing import Any

import psycopg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.helpers import partition_of as reference
from tests.logclient import logged

# Anything PostgreSQL text can hold: no NUL, no lone surrogates (not encodable as UTF-8).
keys = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=64
)
partition_counts = st.integers(min_value=1, max_value=1024)
# The DB fixture is only read by the property (a pure SQL function), so reusing it is fine.
db_settings = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def sql_partitions(conn: psycopg.Connection[Any], pairs: list[tuple[str, int]]) -> list[int]:
    rows = conn.execute(
        "SELECT pgcg.partition_for(k, n) AS p FROM unnest(%s::text[], %s::int[]) "
        "WITH ORDINALITY AS u(k, n, ord) ORDER BY ord",
        ([k for k, _ in pairs], [n for _, n in pairs]),
    ).fetchall()
    return [r["p"] for r in rows]


def test_reference_on_fixed_values(db: psycopg.Connection[Any]) -> None:
    # md5('a') = 0cc175b9...: 0x0cc175b9 = 214004153; the high bit set case: md5('b') = 92eb5ffe...
    assert reference("a", 1 << 31) == 0x0CC175B9
    assert reference("b", 1 << 32) == 0x92EB5FFE
    pairs = [("a", 1024), ("b", 1024), ("b", 7), ("", 3), ("ключ", 16), ("🔑", 1000)]
    assert sql_partitions(db, pairs) == [reference(k, n) for k, n in pairs]


@db_settings
@given(st.lists(st.tuples(keys, partition_counts), min_size=1, max_size=40))
@example([("b", 1024), ("\uffff", 2), ("\U0001d518", 1), ("k" * 64, 1024)])
def test_sql_partition_equals_reference(
    db: psycopg.Connection[Any], pairs: list[tuple[str, int]]
) -> None:
    assert sql_partitions(db, pairs) == [reference(k, n) for k, n in pairs]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(keys.filter(bool), min_size=1, max_size=30))
def test_enqueue_stores_each_message_in_its_keys_partition(
    db: psycopg.Connection[Any], batch: list[str]
) -> None:
    partitions = 13
    db.execute("SELECT pgcg.create_topic('hashed', %s)", (partitions,))
    done = enqueue_many_sync(db, "hashed", [OutgoingMessage(k, {"k": k}) for k in batch])
    assert [e.partition for e in done] == [reference(k, partitions) for k in batch]
    # The topic outlives one example (the fixture is shared): look at this batch's ids.
    sent_ids = {e.id for e in done}
    rows = {r["id"]: r for r in logged(db, "hashed") if r["id"] in sent_ids}
    assert len(rows) == len(batch)
    for key, sent in zip(batch, done, strict=True):
        row = rows[sent.id]  # type: ignore[index]
        assert row["key"] == key
        assert row["partition"] == reference(key, partitions)
        assert sent.id == row["offset"] * 1024 + row["partition"]
