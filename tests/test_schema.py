"""Migrations against a real PostgreSQL: replay from nothing, idempotence, concurrent migrators."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg.shared import migrate as mig
from pgcg.shared.errors import SchemaNotMigrated
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync

# The storage of docs/design/storage.md: topics as logs, groups with their positions,
# ledger and parked queues (the old messages and subscriptions tables are gone).
TABLES = {
    "consumer_groups",
    "coordinator_leader",
    "dead_letters",
    "dedup",
    "group_losses",
    "group_progress",
    "groups",
    "ledger",
    "log",
    "parked",
    "partition_assignments",
    "rebalances",
    "role_scopes",
    "schema_migrations",
    "segments",
    "ticks",
    "topics",
}
# What producers in any language, the CLI and consumers call by name (the full list of
# objects is compared with the test template below).
FUNCTIONS = {
    "adopt",
    "alter_topic",
    "create_group",
    "create_topic",
    "delete_group",
    "enqueue",
    "fetch",
    "group_lag",
    "maintain",
    "max_dedup_key_bytes",
    "max_delay_ms",
    "max_headers_bytes",
    "max_key_bytes",
    "partition_for",
    "release",
    "replay_dead_letters",
    "save_position",
    "seek_group",
    "settle",
    "tick",
}


def objects(conn: psycopg.Connection[Any]) -> dict[str, set[str]]:
    """The pgcg schema's own objects, by kind (the topics' log and ledger tables, partitions
    of pgcg.log and pgcg.ledger, excluded)."""
    rel = conn.execute(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'pgcg' AND NOT c.relispartition"
    ).fetchall()
    fns = conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'pgcg'"
    ).fetchall()
    return {
        "tables": {r["relname"] for r in rel if r["relkind"] in ("r", "p")},
        "sequences": {r["relname"] for r in rel if r["relkind"] == "S"},
        "functions": {r["proname"] for r in fns},
    }


def connect(dsn: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)


def test_replay_from_empty_creates_every_object(empty_dsn: str) -> None:
    with connect(empty_dsn) as conn:
        assert mig.current_version(conn) == 0
        with pytest.raises(SchemaNotMigrated, match="pgcg migrate"):
            mig.check(conn)

    applied = mig.migrate(empty_dsn)

    assert [m.version for m in applied] == list(range(1, mig.LATEST + 1))
    with connect(empty_dsn) as conn:
        found = objects(conn)
        assert found["tables"] == TABLES
        assert found["functions"] >= FUNCTIONS, FUNCTIONS - found["functions"]
        assert {"tick_seq", "topic_id_seq", "group_id_seq"} <= found["sequences"]
        assert mig.current_version(conn) == mig.LATEST
        mig.check(conn)
        rows = conn.execute(
            "SELECT version, name, applied_at FROM pgcg.schema_migrations ORDER BY version"
        ).fetchall()
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in applied]
    assert rows[0]["name"] == "initial"
    assert all(r["applied_at"] is not None for r in rows)


def test_replayed_schema_matches_the_test_template(empty_dsn: str, dsn: str) -> None:
    """The template every other test runs on went through the same code path: same objects."""
    mig.migrate(empty_dsn)
    with connect(empty_dsn) as fresh, connect(dsn) as template:
        assert objects(fresh) == objects(template)


def test_migrating_twice_is_a_no_op(empty_dsn: str) -> None:
    mig.migrate(empty_dsn)
    with connect(empty_dsn) as conn:
        before = conn.execute("SELECT * FROM pgcg.schema_migrations ORDER BY version").fetchall()

    assert mig.migrate(empty_dsn) == []

    with connect(empty_dsn) as conn:
        after = conn.execute("SELECT * FROM pgcg.schema_migrations ORDER BY version").fetchall()
    assert after == before


def test_concurrent_migrators_all_succeed_and_apply_once(empty_dsn: str) -> None:
    """Pods starting together: the advisory lock makes one apply and the others find it done."""
    n = 6
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: mig.migrate(empty_dsn), range(n)))

    applied = [r for r in results if r]
    assert len(applied) == 1, results
    assert [m.version for m in applied[0]] == list(range(1, mig.LATEST + 1))
    with connect(empty_dsn) as conn:
        versions = [
            r["version"] for r in conn.execute("SELECT version FROM pgcg.schema_migrations")
        ]
        assert sorted(versions) == list(range(1, mig.LATEST + 1))
        # and the schema works
        conn.execute("SELECT pgcg.create_topic('t', 2)")
        assert enqueue_many_sync(conn, "t", [OutgoingMessage("k", 1)])[0].id is not None


def test_concurrent_migrate_commands(empty_dsn: str) -> None:
    """The same through the CLI, as separate processes."""
    env = {**os.environ, "PGCG_DATABASE_URL": empty_dsn, "PGCG_LOG_FORMAT": "json"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pgcg.shared.cli", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    stdout = sorted(o[0].strip() for o in outs)
    everything = ", ".join(f"{m.version:04d}_{m.name}" for m in mig.migrations())
    assert stdout == [f"applied {everything}", "schema is up to date", "schema is up to date"]


def test_using_an_unmigrated_database_says_run_migrate(empty_dsn: str, cli: Any) -> None:
    with connect(empty_dsn) as conn, pytest.raises(SchemaNotMigrated, match="pgcg migrate"):
        enqueue_many_sync(conn, "t", [OutgoingMessage("k", 1)])
    done = cli(empty_dsn, "produce", "--topic", "t", "--key", "k", "--payload", "1")
    assert done.exit_code == 5
    assert done.stderr.count("\n") == 1 and "pgcg migrate" in done.stderr
