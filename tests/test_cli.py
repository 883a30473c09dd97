"""The `pgcg` command: status against a known state, and every documented error message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgcg.shared.cli import main
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.helpers import assign
from tests.ops_helpers import dead_letter, park

GROUP = "billing"
TOPIC = "orders"


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    result = CliRunner().invoke(main, list(args), env=env or {}, input=stdin)
    return result


def known_state(db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    for member, pid in (("m-a", 101), ("m-b", 102)):
        db.execute(
            "INSERT INTO pgcg.consumer_groups (group_name, member_id, host, pid, "
            "session_timeout_ms, protocol) VALUES (%s, %s, 'host1', %s, 10000, 3)",
            (GROUP, member, pid),
        )
    assign(db, GROUP, TOPIC, [0, 1], "m-a")
    assign(db, GROUP, TOPIC, [2], "m-b")
    db.execute(
        "UPDATE pgcg.partition_assignments SET state = 'revoking', target_member_id = 'm-a', "
        "revoke_deadline = now() + interval '5 seconds' WHERE group_name = %s AND partition = 2",
        (GROUP,),
    )
    db.execute(
        "INSERT INTO pgcg.coordinator_leader (scope, leader_epoch, leader_id, heartbeat_at) "
        "VALUES (%s, 7, 'coord-1', now())",
        (GROUP,),
    )
    enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"k{i}", {"i": i}) for i in range(20)])
    dead_letter(db, GROUP, TOPIC, 999 * 1024, "kx")
    dead_letter(db, "another-group", TOPIC, 998 * 1024, "kx")  # not this group's


def test_status_json_reports_the_known_state(db: psycopg.Connection[Any], dsn: str) -> None:
    known_state(db)
    result = run("status", "--group", GROUP, "--json", env={"PGCG_DATABASE_URL": dsn})
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    (g,) = status["groups"]
    assert g["group"] == GROUP and g["topic"] == TOPIC
    assert g["leader"]["id"] == "coord-1" and g["leader"]["epoch"] == 7 and g["leader"]["alive"]
    assert [(m["member_id"], m["partitions"]) for m in g["members"]] == [("m-a", 2), ("m-b", 1)]
    parts = {p["partition"]: p for p in g["partitions"]}
    assert (parts[0]["owner"], parts[0]["epoch"], parts[0]["state"]) == ("m-a", 1, "assigned")
    assert (parts[2]["state"], parts[2]["target"]) == ("revoking", "m-a")
    assert 0 < parts[2]["revoke_in_s"] <= 5
    assert (parts[3]["owner"], parts[3]["state"]) == (None, "unassigned")
    assert sum(p["lag"] for p in g["partitions"]) == g["lag_total"] == 20
    assert g["dead_letters"] == 1 and g["in_flight_total"] == 0 and g["parked_total"] == 0
    assert all(p["oldest_age_s"] is not None for p in g["partitions"] if p["lag"])
    assert all(p["oldest_age_s"] is None for p in g["partitions"] if not p["lag"])
    table = run("status", env={"PGCG_DATABASE_URL": dsn})
    assert table.exit_code == 0 and "coord-1" in table.output and "revoking" in table.output


def test_lag_query_matches_status(db: psycopg.Connection[Any]) -> None:
    from pgcg.shared.queries import Queries

    known_state(db)
    row = db.execute(Queries("status").group_lag_total, {"group": GROUP}).fetchone()
    assert row is not None and row["lag"] == 20
    db.execute("SELECT pgcg.create_group('late', %s, 'latest')", (TOPIC,))
    row = db.execute(Queries("status").group_lag_total, {"group": "late"}).fetchone()
    assert row is not None and row["lag"] == 0
    row = db.execute(Queries("status").group_lag_total, {"group": "nobody"}).fetchone()
    assert row is not None and row["lag"] == 0


@pytest.mark.parametrize(
    ("args", "env", "code", "needle"),
    [
        (["status"], {}, 2, "no database configured: set PGCG_DATABASE_URL"),
        (["status"], {"PGCG_DATABASE_URL": "postgresql://127.0.0.1:1/x"}, 4,
         "cannot reach PostgreSQL"),
        (["status"], {"PGCG_DATABASE_URL": "not a url ="}, 2, "not a valid connection URL"),
        (["consumer", "--group", "g", "--topic", "t", "--handler", "nocolon"],
         {"PGCG_DATABASE_URL": "postgresql://x"}, 2, "must look like package.module:function"),
        (["consumer", "--group", "g", "--topic", "t", "--handler", "no_such_mod:f"],
         {"PGCG_DATABASE_URL": "postgresql://x"}, 2, "cannot import handler module"),
        (["consumer", "--group", "g", "--topic", "t", "--handler", "m:f", "--session-timeout",
          "1"], {}, 2, "invalid settings: session_timeout"),
        (["coordinator", "--drain-deadline", "2"], {"PGCG_SESSION_TIMEOUT": "10"}, 2,
         "raise PGCG_DRAIN_DEADLINE or lower PGCG_SESSION_TIMEOUT"),
        (["status", "--group", "bad group!"], {"PGCG_DATABASE_URL": "postgresql://x"}, 2,
         "invalid group name"),
    ],
)  # fmt: skip
def test_errors_are_one_clear_line(
    args: list[str], env: dict[str, str], code: int, needle: str
) -> None:
    result = run(*args, env=env)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_database_errors_name_the_fix(dsn: str, empty_dsn: str) -> None:
    not_migrated = run("status", env={"PGCG_DATABASE_URL": empty_dsn})
    assert not_migrated.exit_code == 5 and "run `pgcg migrate`" in not_migrated.output
    unknown_group = run("status", "--group", "nope", env={"PGCG_DATABASE_URL": dsn})
    assert unknown_group.exit_code == 3 and "unknown group 'nope'" in unknown_group.output
    assert "pgcg group create nope" in unknown_group.output
    unknown_topic = run(
        "produce", "--topic", "nope", "--key", "k", "--payload", "{}",
        env={"PGCG_DATABASE_URL": dsn},
    )  # fmt: skip
    assert unknown_topic.exit_code == 3 and "pgcg topic create nope" in unknown_topic.output
    twice = run("topic", "create", "orders", env={"PGCG_DATABASE_URL": dsn})
    assert twice.exit_code == 0
    again = run("topic", "create", "orders", env={"PGCG_DATABASE_URL": dsn})
    assert again.exit_code == 2 and "--if-not-exists" in again.output
    other = run("topic", "create", "orders", "--partitions", "8", "--if-not-exists",
                env={"PGCG_DATABASE_URL": dsn})  # fmt: skip
    assert other.exit_code == 2 and "partition count" in other.output
    migrated = run("migrate", env={"PGCG_DATABASE_URL": empty_dsn})
    assert migrated.exit_code == 0 and "applied 0001_initial" in migrated.output
    assert run("migrate", env={"PGCG_DATABASE_URL": empty_dsn}).output.strip() == (
        "schema is up to date"
    )


def test_help_everywhere_has_examples() -> None:
    for command in (["--help"], ["consumer", "--help"], ["status", "--help"],
                    ["produce", "--help"], ["dlq", "replay", "--help"], ["demo", "--help"],
                    ["coordinator", "--help"], ["migrate", "--help"], ["group", "--help"],
                    ["group", "create", "--help"], ["group", "list", "--help"],
                    ["group", "delete", "--help"], ["group", "seek", "--help"],
                    ["topic", "--help"]):  # fmt: skip
        result = run(*command)
        assert result.exit_code == 0
        assert "xample" in result.output or "Quick start" in result.output, command


@pytest.mark.slow
def test_demo_passes_its_own_check() -> None:
    """`pgcg demo` end to end: throwaway server, real processes, faults, two groups on one
    topic, a verdict for each."""
    result = subprocess.run(
        [sys.executable, "-m", "pgcg.shared.cli", "demo", "--duration", "15"],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "PASS: every message handled" in out
    for event in ("killed consumer-", "started consumer-", "paused coord-", "SIGTERM to",
                  "rebalance #", "lost=0 order_violations=0 concurrent_violations=0"):  # fmt: skip
        assert event in out, event
    # Two groups on one topic, each checked on its own: every group gets every message.
    for group in ("demo-billing", "demo-audit"):
        (line,) = [ln for ln in out.splitlines() if f"verdict for {group}: " in ln]
        produced = line.split("produced=")[1].split()[0]
        assert f"handled={produced} " in line and " lost=0 " in line, line


def test_coordinator_and_consumer_refuse_an_unmigrated_database(empty_dsn: str) -> None:
    for args in (["coordinator"], ["consumer", "--group", "g", "--topic", "t", "--handler",
                                   "pgcg.bench.chaos.journal:record"]):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "pgcg.shared.cli", *args],
            env={**os.environ, "PGCG_DATABASE_URL": empty_dsn},
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 5, result.stderr
        assert "run `pgcg migrate`" in result.stderr and "Traceback" not in result.stderr


def test_status_shows_handler_progress(db: psycopg.Connection[Any], dsn: str) -> None:
    known_state(db)
    # A handler that reports progress runs as a parked delivery, claimed at the epoch.
    message_id = park(db, GROUP, 0, 3, "k0", member="m-a", epoch=1, attempts=2,
                      progress=(40, "page 4 of 10"))  # fmt: skip
    park(db, GROUP, 1, 4, "k1", member="m-a", epoch=0, progress=(10, "a stale epoch's"))
    result = run("status", "--group", GROUP, "--json", env={"PGCG_DATABASE_URL": dsn})
    (g,) = json.loads(result.output)["groups"]
    (p,) = g["progress"]
    assert (p["message_id"], p["member_id"], p["percent"], p["text"], p["attempt"]) == (
        message_id,
        "m-a",
        40.0,
        "page 4 of 10",
        2,
    )
    assert not p["overdue"]
    assert g["parked_total"] == 2 and g["in_flight_total"] == 1
    parts = {q["partition"]: q for q in g["partitions"]}
    assert (parts[0]["parked"], parts[0]["in_flight"]) == (1, 1)
    assert (parts[1]["parked"], parts[1]["in_flight"]) == (1, 0)
    table = run("status", "--group", GROUP, env={"PGCG_DATABASE_URL": dsn})
    assert "40.0% page 4 of 10" in table.output
