"""`pgcg topic create | alter | list` with retention: what is written, and every bad value
refused in one line with exit 2, nothing written."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.ops_helpers import fingerprint, one_line_error

SETTINGS = (
    "SELECT partitions, segments, retention_ms, retention_bytes, hard_retention_ms, "
    "hard_retention_bytes, segment_bytes, dedup_window_ms FROM pgcg.topics WHERE name = %s"
)


def settings_of(db: psycopg.Connection[Any], topic: str) -> dict[str, Any]:
    row = db.execute(SETTINGS, (topic,)).fetchone()
    assert row is not None
    return dict(row)


def test_create_with_retention(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    done = cli(
        dsn, "topic", "create", "events", "--partitions", "4", "--segments", "12",
        "--retention", "7d", "--retention-bytes", "50GB", "--hard-retention", "30d",
        "--hard-retention-bytes", "1TB", "--segment-bytes", "256MB", "--dedup-window", "10m",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == "topic events created (4 partitions, 12 segments)"
    assert settings_of(db, "events") == {
        "partitions": 4, "segments": 12, "retention_ms": 7 * 86_400_000,
        "retention_bytes": 50 << 30, "hard_retention_ms": 30 * 86_400_000,
        "hard_retention_bytes": 1 << 40, "segment_bytes": 256 << 20, "dedup_window_ms": 600_000,
    }  # fmt: skip
    # The ring has as many slot tables as segments.
    slots = db.execute(
        "SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'pgcg.log_events'::regclass"
    ).fetchone()
    assert slots is not None and slots["n"] == 12


def test_create_defaults(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    assert cli(dsn, "topic", "create", "orders").exit_code == 0
    assert settings_of(db, "orders") == {
        "partitions": 16, "segments": 8, "retention_ms": 86_400_000, "retention_bytes": None,
        "hard_retention_ms": None, "hard_retention_bytes": None, "segment_bytes": 1 << 30,
        "dedup_window_ms": 300_000,
    }  # fmt: skip
    again = cli(dsn, "topic", "create", "orders", "--if-not-exists", "--retention", "1h")
    assert again.exit_code == 0
    assert "settings unchanged: use `pgcg topic alter`" in again.stdout
    assert settings_of(db, "orders")["retention_ms"] == 86_400_000


def test_alter_changes_only_what_is_given(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    cli(dsn, "topic", "create", "orders", "--partitions", "2", "--hard-retention", "30d",
        "--retention-bytes", "1GB")  # fmt: skip
    done = cli(dsn, "topic", "alter", "orders", "--retention", "3d", "--hard-retention", "none")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("topic orders: retention 3d, retention bytes 1GB, ")
    after = settings_of(db, "orders")
    assert (after["retention_ms"], after["hard_retention_ms"]) == (3 * 86_400_000, None)
    assert after["retention_bytes"] == 1 << 30  # not given: unchanged
    cleared = cli(dsn, "topic", "alter", "orders", "--retention-bytes", "0")
    assert cleared.exit_code == 0
    assert settings_of(db, "orders")["retention_bytes"] is None


def test_list_shows_retention(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    cli(dsn, "topic", "create", "orders", "--partitions", "2", "--retention", "36h")
    cli(dsn, "topic", "create", "audit_log", "--partitions", "1", "--retention", "90d",
        "--hard-retention-bytes", "2TB")  # fmt: skip
    db.execute("SELECT pgcg.create_group('billing', 'orders')")
    table = cli(dsn, "topic", "list")
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "TOPIC", "PARTITIONS", "SEGMENTS", "RETENTION", "RETENTION-BYTES", "HARD-RETENTION",
        "HARD-RETENTION-BYTES", "GROUPS", "STORED",
    ]  # fmt: skip
    assert [r.split()[:8] for r in rows] == [
        ["audit_log", "1", "8", "90d", "-", "-", "2TB", "0"],
        ["orders", "2", "8", "36h", "-", "-", "-", "1"],
    ]
    lines = [json.loads(line) for line in cli(dsn, "topic", "list", "--json").stdout.splitlines()]
    assert [(t["name"], t["retention_ms"], t["groups"]) for t in lines] == [
        ("audit_log", 90 * 86_400_000, 0),
        ("orders", 36 * 3_600_000, 1),
    ]
    assert all(t["stored_bytes"] > 0 for t in lines)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["create", "orders", "--retention", "7 days"], "--retention '7 days' is not a duration"),
        (["create", "orders", "--retention", "-1d"], "is not a duration"),
        (["create", "orders", "--retention-bytes", "lots"], "--retention-bytes 'lots' is not"),
        (["create", "orders", "--hard-retention", "1x"], "--hard-retention '1x'"),
        (["create", "orders", "--hard-retention-bytes", "1PB"], "is not a size"),
        (["create", "orders", "--segment-bytes", "0"], "--segment-bytes must be more than 0"),
        (["create", "orders", "--dedup-window", "forever"], "--dedup-window 'forever'"),
        (["create", "orders", "--segments", "2"], "--segments must be between 3 and 64"),
        (["create", "orders", "--segments", "65"], "--segments must be between 3 and 64"),
        (["create", "orders", "--segments", "many"], "'many' is not a valid integer"),
        (["create", "orders", "--partitions", "0"], "--partitions must be between 1 and 1024"),
        (["create", "orders", "--partitions", "x"], "'x' is not a valid integer"),
        (["create", "Orders"], "invalid topic name 'Orders'"),
        (["create", "orders", "--retention", "7d", "--hard-retention", "1d"],
         "--hard-retention (1d) must be at least --retention (7d)"),
        (["create", "orders", "--retention-bytes", "2GB", "--hard-retention-bytes", "1GB"],
         "--hard-retention-bytes (1GB) must be at least --retention-bytes (2GB)"),
        (["create", "orders", "--bogus"], "No such option '--bogus'"),
        (["alter", "existing", "--retention", "soon"], "--retention 'soon' is not a duration"),
        (["alter", "existing"], "nothing to change"),
        (["alter", "existing", "--segments", "4"], "--segments is fixed when a topic is created"),
        (["alter", "existing", "--partitions", "4"], "--partitions is fixed"),
        (["alter", "existing", "--hard-retention", "1h"],
         "--hard-retention (1h) must be at least --retention (1d)"),
        (["alter", "bad-name", "--retention", "1d"], "invalid topic name"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_and_write_nothing(
    db: psycopg.Connection[Any], dsn: str, cli: Any, args: list[str], needle: str
) -> None:
    db.execute("SELECT pgcg.create_topic('existing', 2)")
    before = fingerprint(db)
    error = one_line_error(cli(dsn, "topic", *args))
    assert needle in error
    assert fingerprint(db) == before


def test_unknown_topic_is_exit_3(dsn: str, cli: Any) -> None:
    error = one_line_error(cli(dsn, "topic", "alter", "nope", "--retention", "1d"), code=3)
    assert "pgcg topic create nope" in error


def test_help_has_examples(cli: Any) -> None:
    for args in (["topic", "create", "--help"], ["topic", "alter", "--help"],
                 ["topic", "list", "--help"]):  # fmt: skip
        result = cli("postgresql://unused", *args)
        assert result.exit_code == 0 and "xample" in result.output, args
