"""Watching one group from the database, on this host's clock.

The benchmark times events that happen in other processes and in the database. It reads
each event's own timestamp (joined_at, assigned_at, elected_at, a rebalance's started_at,
the journal's finished_at) instead of noting when a poll first saw it, so the polling
rate costs nothing in precision. Database timestamps are moved onto this host's wall
clock with an offset measured once; the journal is written by the consumers on this host
and needs no conversion.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from pgcg.shared.queries import Queries

Q = Queries("bench_rebalance")
T = TypeVar("T")


class BenchTimeout(Exception):
    """A condition the benchmark waits for did not come true within its deadline."""


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, every: float = 0.02) -> T:
    """Poll `cond` until it returns something truthy; BenchTimeout after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


class GroupProbe:
    def __init__(self, dsn: str, group: str, topic: str, *, leader_timeout: float) -> None:
        self.group = group
        self.topic = topic
        self.leader_timeout = leader_timeout
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.offset = self._clock_offset()

    def close(self) -> None:
        self.conn.close()

    def _clock_offset(self, samples: int = 7) -> float:
        """Database clock minus ours, from the round trip with the least delay."""
        best: tuple[float, float] | None = None
        for _ in range(samples):
            sent = time.time()
            row = self._one(Q.clock)
            back = time.time()
            offset = row["now"].timestamp() - (sent + back) / 2
            if best is None or back - sent < best[0]:
                best = (back - sent, offset)
        assert best is not None
        return best[1]

    def local(self, ts: datetime) -> float:
        """A database timestamp as seconds on this host's wall clock."""
        return ts.timestamp() - self.offset

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {
            "group": self.group,
            "topic": self.topic,
            "leader_timeout_s": self.leader_timeout,
            **extra,
        }

    def _one(self, query: str, **extra: Any) -> dict[str, Any]:
        row = self.conn.execute(query, self._params(**extra)).fetchone()
        assert row is not None
        return row

    def _all(self, query: str, **extra: Any) -> list[dict[str, Any]]:
        return self.conn.execute(query, self._params(**extra)).fetchall()

    # -- the group ---------------------------------------------------------------------------

    def members(self) -> dict[str, dict[str, Any]]:
        return {r["member_id"]: r for r in self._all(Q.members)}

    def member_of(self, pid: int) -> dict[str, Any] | None:
        rows = [m for m in self.members().values() if m["pid"] == pid]
        return rows[-1] if rows else None

    def assignments(self) -> list[dict[str, Any]]:
        return self._all(Q.assignments)

    def leader(self) -> dict[str, Any] | None:
        rows = self._all(Q.leader)
        return rows[0] if rows and rows[0]["leader_id"] else None

    def generation(self) -> int:
        return int(self._one(Q.generation)["generation"])

    def first_rebalance_of_new_leader(self, old_epoch: int) -> dict[str, Any] | None:
        rows = self._all(Q.first_rebalance_of_new_leader, leader_epoch=old_epoch)
        return rows[0] if rows else None

    def first_move_away(self, member: str, after_generation: int) -> dict[str, Any] | None:
        rows = self._all(Q.first_move_away, member=member, generation=after_generation)
        return rows[0] if rows else None

    def backlog(self) -> int:
        """Messages the group has not finished yet."""
        return int(self._one(Q.backlog)["pending"])

    # -- the journal -------------------------------------------------------------------------

    def journal_mark(self) -> int:
        return int(self._one(Q.journal_mark)["id"])

    def first_handled(self, after: int, members: list[str]) -> dict[tuple[int, str, int], float]:
        """(partition, member, epoch) -> when a handling of it first finished (our clock)."""
        return {
            (r["partition"], r["member_id"], r["epoch"]): r["finished_at"].timestamp()
            for r in self._all(Q.first_handled, after=after, members=members)
        }
