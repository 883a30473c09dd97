"""Test helpers: waiting on conditions with deadlines, direct assignment, recording handlers."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg.rows import dict_row

from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings

if TYPE_CHECKING:
    from pgcg.consumer.service import Consumer

COORD = Queries("coordinator")

# Timeouts short enough for a test to see expiries and hand-offs in seconds (production:
# heartbeat 2 s, session 10 s, leader 10 s, drain 10 s). FAST_ENV is the same for the
# real processes a test starts; FAST_SETTINGS leaves the leader timeout and drain
# deadline to each module, since not all of them want the short ones.
FAST_SETTINGS: dict[str, Any] = {"heartbeat_interval": 0.5, "session_timeout": 3}
FAST_ENV = {
    "PGCG_HEARTBEAT_INTERVAL": "0.5",
    "PGCG_SESSION_TIMEOUT": "3",
    "PGCG_LEADER_TIMEOUT": "3",
    "PGCG_DRAIN_DEADLINE": "2",
}


def fast_settings(defaults: dict[str, Any], overrides: dict[str, Any]) -> Settings:
    """FAST_SETTINGS, then a test module's `defaults`, then one test's `overrides`."""
    return Settings(**{**FAST_SETTINGS, **defaults, **overrides})


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `cond` until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def await_for(
    cond: Callable[[], Any | Awaitable[Any]], timeout: float = 20.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await anyio.sleep(0.02)


def assign(
    conn: psycopg.Connection[Any], group: str, topic: str, partitions: list[int], member: str
) -> None:
    """Give partitions to a member outright, with the coordinator's own statement."""
    conn.execute(
        COORD.assign,
        {
            "group": group,
            "topic": topic,
            "partitions": partitions,
            "members": [member] * len(partitions),
        },
    )
    conn.execute(COORD.notify_group, {"group": group})


def owners(conn: psycopg.Connection[Any], group: str) -> dict[int, tuple[str | None, int, str]]:
    rows = conn.execute(
        "SELECT partition, member_id, epoch, state FROM pgcg.partition_assignments "
        "WHERE group_name = %s ORDER BY partition",
        (group,),
    ).fetchall()
    return {r["partition"]: (r["member_id"], r["epoch"], r["state"]) for r in rows}


UNFINISHED = """
SELECT (
    SELECT count(*) FROM pgcg.log AS l
    JOIN pgcg.group_progress AS gp ON gp.group_id = g.id AND gp.partition = l.partition
    JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gp.tick
    WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
      AND NOT pg_visible_in_snapshot(l.txid, k.snapshot)
      AND (l.only_group IS NULL OR l.only_group = g.id)
      AND NOT EXISTS (
          SELECT FROM pgcg.ledger AS d
          WHERE d.group_id = g.id AND d.partition = l.partition AND d.kind = 'd'
            AND d.gen = g.seek_gen AND l."offset" = ANY (coalesce(d.offsets, ARRAY[d."offset"])))
) + (SELECT count(*) FROM pgcg.parked AS pk WHERE pk.group_id = g.id) AS n
FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
WHERE g.group_name = %(group)s
"""


UNFINISHED_IDS = """
SELECT l."offset" * 1024 + l.partition AS id
FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
JOIN pgcg.log AS l ON l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
JOIN pgcg.group_progress AS gp ON gp.group_id = g.id AND gp.partition = l.partition
JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gp.tick
WHERE g.group_name = %(group)s
  AND NOT pg_visible_in_snapshot(l.txid, k.snapshot)
  AND (l.only_group IS NULL OR l.only_group = g.id)
  AND NOT EXISTS (
      SELECT FROM pgcg.ledger AS d
      WHERE d.group_id = g.id AND d.partition = l.partition AND d.kind = 'd'
        AND d.gen = g.seek_gen AND l."offset" = ANY (coalesce(d.offsets, ARRAY[d."offset"])))
UNION
SELECT pk."offset" * 1024 + pk.partition FROM pgcg.parked AS pk
JOIN pgcg.groups AS g ON g.id = pk.group_id WHERE g.group_name = %(group)s
"""


def unfinished_ids(conn: psycopg.Connection[Any], group: str) -> set[int]:
    """Ids of the messages `group` has not finished (see unfinished)."""
    return {
        r["id"] if isinstance(r, dict) else r[0]
        for r in conn.execute(UNFINISHED_IDS, {"group": group})
    }


def parked(conn: psycopg.Connection[Any], group: str) -> list[dict[str, Any]]:
    """The group's parked messages, in their order: id, attempts, error, origin, due."""
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(
        'SELECT pk."offset" * 1024 + pk.partition AS id, pk.key, pk.attempts, pk.last_error, '
        "pk.origin, pk.available_at > now() AS waiting, pk.claimed_epoch "
        "FROM pgcg.parked AS pk JOIN pgcg.groups AS g ON g.id = pk.group_id "
        "WHERE g.group_name = %s ORDER BY pk.id",
        (group,),
    ).fetchall()


def unfinished(conn: psycopg.Connection[Any], group: str) -> int:
    """Messages `group` has not finished: log messages after its position without a
    completion, plus its parked ones (what it still has to handle or dead-letter)."""
    row = conn.execute(UNFINISHED, {"group": group}).fetchone()
    return int(row["n"] if isinstance(row, dict) else row[0]) if row else 0  # type: ignore[index]


def stored(conn: psycopg.Connection[Any], topic: str) -> int:
    """Messages a topic's log holds (whatever any group did with them)."""
    row = conn.execute(
        "SELECT count(*) AS n FROM pgcg.log AS l JOIN pgcg.topics AS t "
        "ON l.slot BETWEEN t.id * 64 AND t.id * 64 + 63 WHERE t.name = %s",
        (topic,),
    ).fetchone()
    return int(row["n"] if isinstance(row, dict) else row[0])  # type: ignore[index]


def pending(conn: psycopg.Connection[Any], topic: str) -> int:
    """What the groups of `topic` still have to do: the most any of them has unfinished
    (tests here run one group per topic); with no group, what the topic holds."""
    groups = [
        r["group_name"] if isinstance(r, dict) else r[0]
        for r in conn.execute("SELECT group_name FROM pgcg.groups WHERE topic = %s", (topic,))
    ]
    if not groups:
        return stored(conn, topic)
    return max(unfinished(conn, g) for g in groups)


def partition_of(key: str, partitions: int) -> int:
    """The documented key hash: first 4 bytes of md5(UTF-8 key), big-endian, mod partitions."""
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "big") % partitions


def key_in(partition: int, partitions: int, prefix: str = "key") -> str:
    """The first `prefix-N` key that hashes to `partition`."""
    return next(
        k for n in range(100_000) if partition_of(k := f"{prefix}-{n}", partitions) == partition
    )


@contextlib.asynccontextmanager
async def running(*consumers: Consumer) -> AsyncIterator[None]:
    """Run consumers in this test's event loop; stop them (gracefully) on the way out."""
    async with anyio.create_task_group() as tg:
        for consumer in consumers:
            tg.start_soon(functools.partial(consumer.run, install_signal_handlers=False))
        for consumer in consumers:
            await consumer.joined.wait()
        try:
            yield
        finally:
            for consumer in consumers:
                consumer.stop()


class FakeClock:
    """A monotonic clock the test moves (the coordinator's `clock`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
