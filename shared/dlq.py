"""Dead letters, per group: list, replay into the group's log (keeping key order), purge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from pgcg.shared import names
from pgcg.shared.db import translated
from pgcg.shared.errors import InvalidInput, UnknownGroup
from pgcg.shared.queries import Queries

Q = Queries("dlq")


@dataclass(frozen=True)
class Filter:
    topic: str | None = None
    key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000
    group: str | None = None

    def params(self) -> dict[str, Any]:
        if self.topic is not None:
            names.topic_name(self.topic)
        if self.group is not None:
            names.group_name(self.group)
        if self.limit < 1:
            raise InvalidInput("--limit must be at least 1")
        if self.since and self.until and self.since >= self.until:
            raise InvalidInput("--since must be before --until")
        return {
            "group": self.group,
            "topic": self.topic,
            "key": self.key,
            "since": self.since,
            "until": self.until,
            "limit": self.limit,
        }

    @property
    def empty(self) -> bool:
        return (
            self.group is None
            and self.topic is None
            and self.key is None
            and self.since is None
            and self.until is None
        )


@dataclass(frozen=True)
class Replayed:
    dead_letter: int  # the dead letter's row id (gone now)
    message_id: int  # the id the message had when it died
    id: int  # its new id: a new message at the end of the log, for its group only
    partition: int


def list_dead(conn: psycopg.Connection[Any], f: Filter) -> list[dict[str, Any]]:
    with translated():
        return list(conn.execute(Q.list, f.params()).fetchall())


def replay(conn: psycopg.Connection[Any], f: Filter) -> list[Replayed]:
    """Put the group's dead letters that match back into its topic's log, for that group
    only; they are handled after the messages of their key enqueued before the replay."""
    if f.group is None:
        raise InvalidInput("replay needs --group: dead letters are replayed to their own group")
    params = f.params()
    with translated(), conn.transaction():
        picked = {r["id"]: r["message_id"] for r in conn.execute(Q.pick, params)}
        try:
            rows = conn.execute(Q.replay, {"group": f.group, "ids": list(picked)}).fetchall()
        except psycopg.Error as exc:
            if getattr(exc, "sqlstate", None) == "PGC04":
                raise UnknownGroup(
                    f"unknown group {f.group!r}: its dead letters can only be listed and "
                    "purged now (or check the name with `pgcg group list`)"
                ) from None
            raise
    return [
        Replayed(r["dead_letter"], picked[r["dead_letter"]], r["id"], r["partition"]) for r in rows
    ]


def purge(conn: psycopg.Connection[Any], f: Filter, *, everything: bool = False) -> int:
    if f.empty and not everything:
        raise InvalidInput(
            "purge needs a filter (--group, --topic, --key, --since, --until) or --all"
        )
    with translated(), conn.transaction():
        return len(conn.execute(Q.purge, f.params()).fetchall())
