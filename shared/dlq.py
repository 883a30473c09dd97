"""Dead letters: list, replay into the queue (keeping key order), purge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from pgcg.shared import names
from pgcg.shared.db import translated
from pgcg.shared.errors import InvalidInput
from pgcg.shared.queries import Queries

Q = Queries("dlq")


@dataclass(frozen=True)
class Filter:
    topic: str | None = None
    key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000

    def params(self) -> dict[str, Any]:
        if self.topic is not None:
            names.topic_name(self.topic)
        if self.limit < 1:
            raise InvalidInput("--limit must be at least 1")
        if self.since and self.until and self.since >= self.until:
            raise InvalidInput("--since must be before --until")
        return {
            "topic": self.topic,
            "key": self.key,
            "since": self.since,
            "until": self.until,
            "limit": self.limit,
        }

    @property
    def empty(self) -> bool:
        return self.topic is None and self.key is None and self.since is None and self.until is None


def list_dead(conn: psycopg.Connection[Any], f: Filter) -> list[dict[str, Any]]:
    with translated():
        return list(conn.execute(Q.list, f.params()).fetchall())


def replay(conn: psycopg.Connection[Any], f: Filter) -> list[dict[str, Any]]:
    with translated(), conn.transaction():
        return list(conn.execute(Q.replay, f.params()).fetchall())


def purge(conn: psycopg.Connection[Any], f: Filter, *, everything: bool = False) -> int:
    if f.empty and not everything:
        raise InvalidInput("purge needs a filter (--topic, --key, --since, --until) or --all")
    with translated(), conn.transaction():
        return len(conn.execute(Q.purge, f.params()).fetchall())
