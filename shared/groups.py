"""Consumer groups as an operator manages them: create at a position, list, delete, seek.

Every group reads its topic's whole log at its own pace, with its own position, members,
parked messages and dead letters. A group joined before it was created starts at the
earliest retained message. Seeking (Kafka's reset-offsets) is safe while members run:
the database bumps every moved partition's epoch in the same transaction, so the owners
drop what they hold and adopt the partition again at the new position.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgcg.shared import names, tracing
from pgcg.shared.db import translated
from pgcg.shared.errors import InvalidInput, UnknownGroup
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.groups")
Q = Queries("groups")

POSITION_HELP = "earliest, latest, or a timestamp such as 2026-03-01T12:00:00Z (UTC if no zone)"
_MESSAGE = re.compile(r"(\d{1,4}):(\d{1,18})")
_MAX_PARTITIONS = 1024


def parse_position(text: str, flag: str, *, message: bool = False) -> str:
    """What pgcg.create_group / pgcg.seek_group take: 'earliest', 'latest', an ISO
    timestamp with its zone, or (with `message`) '<partition>:<id>'."""
    value = (text or "").strip()
    if value.lower() in ("earliest", "latest"):
        return value.lower()
    found = _MESSAGE.fullmatch(value)
    if found and message:
        partition = int(found.group(1))
        if partition >= _MAX_PARTITIONS:
            raise InvalidInput(f"{flag} {text!r}: no topic has a partition {partition}")
        return f"{partition}:{int(found.group(2))}"
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        extra = ", or <partition>:<id> of a message" if message else ""
        raise InvalidInput(
            f"{flag} {text!r} is not a position: use {POSITION_HELP}{extra}"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.isoformat()


def create(conn: psycopg.Connection[Any], group: str, topic: str, start: str = "earliest") -> bool:
    """Create `group` on `topic`, positioned at `start` (see parse_position); False if it
    already exists on that topic."""
    names.group_name(group)
    names.topic_name(topic)
    start = parse_position(start, "--from")
    with translated():
        row = conn.execute(Q.create, {"group": group, "topic": topic, "from": start}).fetchone()
    return bool(row and row["created"])


def list_groups(conn: psycopg.Connection[Any], topic: str | None = None) -> list[dict[str, Any]]:
    if topic is not None:
        names.topic_name(topic)
    with translated():
        return [dict(r) for r in conn.execute(Q.list, {"topic": topic})]


def delete(conn: psycopg.Connection[Any], group: str, *, force: bool = False) -> int:
    """Delete `group`: its position, parked messages, assignments and leadership; what only
    it held back in its topic's log can then be reclaimed. Refused while it has members
    unless forced (they are expelled). Returns how many dead letters it leaves behind
    (kept under its name until purged)."""
    names.group_name(group)
    with translated(), conn.transaction():
        try:
            row = conn.execute(Q.delete, {"group": group, "force": force}).fetchone()
        except psycopg.Error as exc:
            if getattr(exc, "sqlstate", None) == "PGC09":
                raise InvalidInput(
                    f"group {group!r} has live members: stop its consumers first, or pass "
                    "--force to expel them (they stop handling at once)"
                ) from None
            raise
        if not (row and row["deleted"]):
            raise UnknownGroup(f"unknown group {group!r}: check the name with `pgcg group list`")
        left = conn.execute(Q.dead_letters, {"group": group}).fetchone()
    return int(left["n"]) if left else 0


@dataclass(frozen=True)
class Seek:
    group: str
    topic: str
    to: str
    partitions: list[dict[str, Any]]  # partition, tick (the new position), dropped, lag

    @property
    def dropped(self) -> int:
        return sum(p["dropped"] for p in self.partitions)

    @property
    def lag(self) -> int:
        return sum(p["lag"] for p in self.partitions)


def seek(conn: psycopg.Connection[Any], group: str, to: str) -> Seek:
    """Move `group` to `to` ('earliest', 'latest', a timestamp, or '<partition>:<id>' to
    resume that partition with that message). The group's parked messages in the moved
    partitions are dropped (they are read again from the log, or skipped). One log record
    (action=group_seek) and one span."""
    names.group_name(group)
    target = parse_position(to, "--to", message=True)
    with translated():
        found = conn.execute(Q.topic_of, {"group": group}).fetchone()
    if found is None:
        raise UnknownGroup(f"unknown group {group!r}: check the name with `pgcg group list`")
    fields = {"group": group, "topic": found["topic"]}
    with tracing.event_span("pgcg group seek", fields, **{"pgcg.seek.to": target}) as span:
        with translated(), conn.transaction():
            moved = conn.execute(Q.seek, {"group": group, "to": target}).fetchall()
            lags = {r["partition"]: r["lag"] for r in conn.execute(Q.lag, {"group": group})}
        result = Seek(
            group,
            found["topic"],
            target,
            [
                {"partition": r["partition"], "tick": r["tick"], "dropped": r["dropped"],
                 "lag": lags.get(r["partition"], 0)}
                for r in moved
            ],
        )  # fmt: skip
        if span.is_recording():
            span.set_attribute("pgcg.seek.partitions", len(result.partitions))
            span.set_attribute("pgcg.seek.parked_dropped", result.dropped)
        log.info(
            "group %s of topic %s moved to %s in %d partition(s): %d message(s) to read, "
            "%d parked message(s) dropped",
            group, result.topic, target, len(result.partitions), result.lag, result.dropped,
            extra={"action": "group_seek", **fields, "to": target,
                   "partitions": result.partitions, "dropped": result.dropped},
        )  # fmt: skip
    return result
