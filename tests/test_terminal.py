"""Text from the database reaches the terminal escaped: a key, member id, host, error or
progress note holding terminal escape sequences is printed as visible characters."""

from __future__ import annotations

import json
import logging
from typing import Any

import click
import psycopg
from click.testing import CliRunner

from pgcg.shared.cli import run_cli
from pgcg.shared.errors import InvalidInput
from pgcg.shared.telemetry import TextFormatter
from pgcg.shared.terminal import printable
from tests.ops_helpers import park
from tests.test_cli import GROUP, TOPIC, known_state, run

TITLE = "\x1b]0;pwned\x07"  # sets the terminal's title when printed raw
CLEAR = "\x1b[2J\x1b[H"  # clears the screen
RAW = ("\x1b", "\x07", "\u202e")


def _raw(text: str) -> bool:
    return any(c in text for c in RAW)


def test_printable_escapes_controls_and_invisible_reordering() -> None:
    assert printable(TITLE) == "\\x1b]0;pwned\\x07"
    assert printable("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert printable("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert printable("\x9b31m") == "\\x9b31m"  # the one-byte C1 escape
    assert printable("café 東京 ✓") == "café 東京 ✓"
    assert printable("line\n\x1b", keep_newlines=True) == "line\n\\x1b"


def test_dlq_list_escapes_keys_and_errors(db: psycopg.Connection[Any], dsn: str) -> None:
    known_state(db)
    db.execute(
        "INSERT INTO pgcg.dead_letters (message_id, topic, partition, key, payload, headers, "
        "enqueued_at, attempts, last_error, group_name) "
        "VALUES (1000, %s, 0, %s, '{}', '{}', now(), 3, %s, %s)",
        (TOPIC, TITLE, f"boom{CLEAR}\u202e", f"g{TITLE}"),
    )
    table = run("dlq", "list", env={"PGCG_DATABASE_URL": dsn})
    assert table.exit_code == 0, table.output
    assert not _raw(table.output)
    assert "\\x1b]0;pwned\\x07" in table.output and "boom\\x1b[2J\\x1b[H\\u202e" in table.output
    lines = run("dlq", "list", "--json", env={"PGCG_DATABASE_URL": dsn})
    assert not _raw(lines.output)
    assert TITLE in [json.loads(line)["key"] for line in lines.output.splitlines()]
    only = run("dlq", "list", "--key", TITLE, env={"PGCG_DATABASE_URL": dsn})
    assert only.exit_code == 0 and len(only.output.splitlines()) == 1


def test_status_escapes_members_hosts_and_progress(db: psycopg.Connection[Any], dsn: str) -> None:
    known_state(db)
    db.execute(
        "INSERT INTO pgcg.consumer_groups (group_name, member_id, host, pid, "
        "session_timeout_ms, protocol) VALUES (%s, %s, %s, 7, 10000, 3)",
        (GROUP, f"m-{TITLE}", f"h{CLEAR}"),
    )
    park(db, GROUP, 0, 3, "k", member="m-a", epoch=1, progress=(40, f"page{CLEAR}"))
    db.execute(
        "INSERT INTO pgcg.rebalances (group_name, generation, leader_epoch, reason, members, "
        "moves, started_at, duration_ms) VALUES (%s, 1, 1, %s, 1, '[]', now(), 1)",
        (GROUP, f"member joined ({TITLE})"),
    )
    text = run("status", env={"PGCG_DATABASE_URL": dsn})
    assert text.exit_code == 0, text.output
    assert not _raw(text.output)
    assert "m-\\x1b]0;pwned\\x07" in text.output and "page\\x1b[2J" in text.output
    as_json = run("status", "--json", env={"PGCG_DATABASE_URL": dsn})
    assert not _raw(as_json.output)
    members = json.loads(as_json.output)["groups"][0]["members"]
    assert f"m-{TITLE}" in [m["member_id"] for m in members]  # JSON keeps the real value


def test_errors_are_one_escaped_line() -> None:
    """Whatever an error quotes (a database message, a name) prints as one visible line."""

    @click.command()
    @run_cli
    def fails() -> None:
        raise InvalidInput(f"rejected by the database: key {TITLE}\nsecond line")

    result = CliRunner().invoke(fails, [])
    assert result.exit_code == 2
    assert (
        result.output == "pgcg: error: rejected by the database: key \\x1b]0;pwned\\x07"
        "\\nsecond line\n"
    )


def test_text_logs_escape_what_they_quote() -> None:
    record = logging.LogRecord(
        "pgcg.t", logging.WARNING, __file__, 1, "member %s left", (TITLE,), None
    )
    record.member_id = TITLE
    line = TextFormatter().format(record)
    assert not _raw(line) and "member \\x1b]0;pwned\\x07 left" in line
