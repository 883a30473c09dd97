"""Helpers of the operator-facing tests (groups, topics, retention, status, dead letters)."""

from __future__ import annotations

import json
from typing import Any

import click.testing
import psycopg

# Every table an operator command may write: a refused command must leave them as they were.
WRITTEN_BY_COMMANDS = (
    "pgcg.topics",
    "pgcg.groups",
    "pgcg.group_progress",
    "pgcg.partition_assignments",
    "pgcg.segments",
    "pgcg.parked",
    "pgcg.dead_letters",
    "pgcg.consumer_groups",
)


def fingerprint(db: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Every row of every table an operator command writes, as text, sorted."""
    return {
        table: sorted(
            str(r) for r in db.execute(f"SELECT t::text AS r FROM {table} AS t").fetchall()
        )
        for table in WRITTEN_BY_COMMANDS
    }


def one_line_error(result: click.testing.Result, code: int = 2) -> str:
    """The error of a refused command: one line on stderr, nothing on stdout, `code`."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("pgcg: error: "), errors[0]
    assert result.stdout == "", result.stdout
    return errors[0]


def log_records(result: click.testing.Result, action: str) -> list[dict[str, Any]]:
    """The JSON log records with this action that a command wrote to stderr."""
    out = []
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("action") == action:
                out.append(record)
    return out


def maintain(db: psycopg.Connection[Any], topic: str) -> list[tuple[Any, ...]]:
    """One upkeep round of `topic` (what every coordinator runs): (event, seq, group, n)."""
    rows = db.execute("SELECT * FROM pgcg.maintain(%s)", (topic,)).fetchall()
    return [(r["event"], r["seq"], r["group_name"], r["n"]) for r in rows]


def segment_states(db: psycopg.Connection[Any], topic: str) -> dict[int, str]:
    rows = db.execute(
        "SELECT s.seq, CASE WHEN s.reclaimed_at IS NOT NULL THEN 'reclaimed' "
        "WHEN s.sealed_at IS NOT NULL THEN 'sealed' ELSE 'open' END AS state "
        "FROM pgcg.segments AS s JOIN pgcg.topics AS t ON t.id = s.topic_id "
        "WHERE t.name = %s ORDER BY s.seq",
        (topic,),
    ).fetchall()
    return {r["seq"]: r["state"] for r in rows}


def park(
    db: psycopg.Connection[Any],
    group: str,
    partition: int,
    offset: int,
    key: str,
    *,
    member: str | None = None,
    epoch: int | None = None,
    attempts: int = 1,
    progress: tuple[float, str] | None = None,
) -> int:
    """A parked message of `group`, claimed by `member` at `epoch` when given, with a
    progress report when given. Returns its message id."""
    db.execute(
        "INSERT INTO pgcg.parked (group_id, partition, gen, \"offset\", tick, key, payload, "
        "enqueued_at, available_at, attempts, origin, claimed_epoch, claimed_by, "
        "locked_until, progress) "
        "SELECT g.id, %(p)s, g.seek_gen, %(o)s, 0, %(k)s, '{}', now(), now(), %(a)s, 'retry', "
        "%(e)s, %(m)s, CASE WHEN %(m)s::text IS NULL THEN NULL "
        "ELSE now() + interval '60 seconds' END, "
        "CASE WHEN %(pct)s::float8 IS NULL THEN NULL ELSE jsonb_build_object("
        "'percent', %(pct)s::float8, 'text', %(txt)s::text, 'at', now()) END "
        "FROM pgcg.groups AS g WHERE g.group_name = %(g)s",
        {"g": group, "p": partition, "o": offset, "k": key, "a": attempts, "e": epoch,
         "m": member, "pct": progress[0] if progress else None,
         "txt": progress[1] if progress else None},
    )  # fmt: skip
    return offset * 1024 + partition


def dead_letter(
    db: psycopg.Connection[Any],
    group: str | None,
    topic: str,
    message_id: int,
    key: str,
    *,
    dead_at: Any = None,
    payload: Any = None,
    error: str = "boom",
    dedup_key: str | None = None,
) -> None:
    """A dead letter as a consumer of `group` writes it."""
    db.execute(
        "INSERT INTO pgcg.dead_letters (message_id, topic, partition, \"offset\", key, payload, "
        "headers, dedup_key, enqueued_at, attempts, last_error, reason, group_name, dead_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, '{}', %s, now(), 3, %s, %s, %s, "
        "coalesce(%s, now()))",
        (message_id, topic, message_id % 1024, message_id // 1024, key,
         json.dumps(payload if payload is not None else {"m": message_id}), dedup_key, error,
         error, group, dead_at),
    )  # fmt: skip
