"""Topics as an operator manages them: created with their retention, changed, listed.

A topic is a retained log. `retention` is how long finished messages stay (for replay and
for groups created later); `retention_bytes` lets the oldest segments that no group needs
go sooner when the log is bigger. A message some group has not finished is never dropped,
unless a hard limit (`hard_retention`, `hard_retention_bytes`) says so: then the lagging
groups' losses are counted and logged. The ring's segment count is fixed at creation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from pgcg.shared import names
from pgcg.shared.db import translated
from pgcg.shared.errors import InvalidInput
from pgcg.shared.queries import Queries
from pgcg.shared.units import format_duration, format_size, parse_duration, parse_size

Q = Queries("topics")

MIN_SEGMENTS, MAX_SEGMENTS, DEFAULT_SEGMENTS = 3, 64, 8
MAX_PARTITIONS = 1024
_NONE = ("none", "off")


@dataclass(frozen=True)
class Retention:
    """Settings to write; None leaves one as it is, 0 clears a hard limit or the size
    retention."""

    retention_ms: int | None = None
    retention_bytes: int | None = None
    hard_retention_ms: int | None = None
    hard_retention_bytes: int | None = None
    segment_bytes: int | None = None
    dedup_window_ms: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        retention: str | None = None,
        retention_bytes: str | None = None,
        hard_retention: str | None = None,
        hard_retention_bytes: str | None = None,
        segment_bytes: str | None = None,
        dedup_window: str | None = None,
    ) -> Retention:
        """From what an operator typed; InvalidInput naming the flag for a bad value."""
        return cls(
            retention_ms=_maybe(retention, "--retention", parse_duration),
            retention_bytes=_clearable(retention_bytes, "--retention-bytes", parse_size),
            hard_retention_ms=_clearable(hard_retention, "--hard-retention", parse_duration),
            hard_retention_bytes=_clearable(
                hard_retention_bytes, "--hard-retention-bytes", parse_size
            ),
            segment_bytes=_positive(segment_bytes, "--segment-bytes", parse_size),
            dedup_window_ms=_maybe(dedup_window, "--dedup-window", parse_duration),
        )

    @property
    def empty(self) -> bool:
        return all(v is None for v in asdict(self).values())

    def params(self, name: str) -> dict[str, Any]:
        return {"name": name, **asdict(self)}


def _maybe(text: str | None, flag: str, parse: Any) -> int | None:
    return None if text is None else int(parse(text, flag))


def _positive(text: str | None, flag: str, parse: Any) -> int | None:
    value = _maybe(text, flag, parse)
    if value == 0:
        raise InvalidInput(f"{flag} must be more than 0")
    return value


def _clearable(text: str | None, flag: str, parse: Any) -> int | None:
    if text is not None and text.strip().lower() in _NONE:
        return 0
    return _maybe(text, flag, parse)


def _check_limits(row: dict[str, Any]) -> None:
    """A hard limit below the soft one would drop unfinished messages before finished ones."""
    if row["hard_retention_ms"] is not None and row["hard_retention_ms"] < row["retention_ms"]:
        raise InvalidInput(
            f"--hard-retention ({format_duration(row['hard_retention_ms'])}) must be at least "
            f"--retention ({format_duration(row['retention_ms'])}): the hard limit drops "
            "messages that groups have not finished yet"
        )
    hard, soft = row["hard_retention_bytes"], row["retention_bytes"]
    if hard is not None and soft is not None and hard < soft:
        raise InvalidInput(
            f"--hard-retention-bytes ({format_size(hard)}) must be at least "
            f"--retention-bytes ({format_size(soft)}): the hard limit drops messages that "
            "groups have not finished yet"
        )


def check_partitions(partitions: int) -> int:
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise InvalidInput(f"--partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}")
    return partitions


def check_segments(segments: int) -> int:
    if not MIN_SEGMENTS <= segments <= MAX_SEGMENTS:
        raise InvalidInput(
            f"--segments must be between {MIN_SEGMENTS} and {MAX_SEGMENTS}, not {segments}"
        )
    return segments


def create(
    conn: psycopg.Connection[Any],
    name: str,
    partitions: int = 16,
    segments: int = DEFAULT_SEGMENTS,
    retention: Retention | None = None,
) -> bool:
    """Create a topic with its settings, in one transaction; False if it already exists
    with this partition count (its settings are then left alone: see `alter`)."""
    names.topic_name(name)
    check_partitions(partitions)
    check_segments(segments)
    retention = retention or Retention()
    with translated(), conn.transaction():
        row = conn.execute(
            Q.create, {"name": name, "partitions": partitions, "segments": segments}
        ).fetchone()
        if not (row and row["created"]):
            return False
        # Applied and checked inside the creating transaction: a bad combination leaves
        # no topic behind.
        settings = conn.execute(Q.alter, retention.params(name)).fetchone()
        assert settings is not None
        _check_limits(settings)
    return True


def alter(conn: psycopg.Connection[Any], name: str, retention: Retention) -> dict[str, Any]:
    """Change a topic's retention and limits; returns its settings afterwards."""
    names.topic_name(name)
    if retention.empty:
        raise InvalidInput(
            "nothing to change: pass --retention, --retention-bytes, --hard-retention, "
            "--hard-retention-bytes, --segment-bytes or --dedup-window"
        )
    with translated(), conn.transaction():
        row = conn.execute(Q.alter, retention.params(name)).fetchone()
        assert row is not None
        _check_limits(row)  # raising rolls the change back
    return dict(row)


def get(conn: psycopg.Connection[Any], name: str) -> dict[str, Any] | None:
    with translated():
        row = conn.execute(Q.get, {"name": name}).fetchone()
    return None if row is None else dict(row)


def list_topics(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with translated():
        return [dict(r) for r in conn.execute(Q.list)]
