"""When a revocation's drain deadline has passed, on the leader's own clock as well as the
database's.

A revoked owner drains on its own monotonic clock: it reads how long it has left
(`revoke_in`, the row's revoke_deadline less the database's now()) once, and counts it
down locally. The row's deadline is on the database's clock, and that clock can step:
forward, and the deadline passes at once while the owner, which read it before the step,
still drains; a forced hand-off then starts the next owner beside handlers the old one
still runs. So the leader forces a hand-off only once the deadline has passed on both
clocks: on the database's (`overdue` of the row) and on its own monotonic clock, counted
from when it saw the revocation start (this leader issued it) or, for a revocation it
did not see start (it has just taken over), from when it first saw the revoking row. A
step the other way only makes the database's clock the later of the two: the owner, which
read the deadline after the step, drains that much longer, and so does the leader.

How long a drain lasts is what the revocation gave the owner: the leader's drain deadline,
but never less than the owner's session timeout (sql/queries/coordinator.sql, `revoke`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from pgcg.coordinator.expiry import Clock


class DrainWatch:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        # group -> (partition, epoch) of each revocation in progress -> when it started,
        # on our clock (or when we first saw it, if we did not see it start)
        self._started: dict[str, dict[tuple[int, int], float]] = {}

    def overdue(
        self, group: str, rows: Iterable[Mapping[str, Any]], drains: Mapping[str, float]
    ) -> set[int]:
        """The partitions whose drain deadline has passed on both clocks.

        `rows`: the group's assignments as the rebalance locked them (partition, member_id,
        epoch, state, overdue: past revoke_deadline on the database's clock); `drains`:
        seconds of drain each owner is given, by member. Revocations no longer in the rows
        are forgotten: a revocation called off and issued again starts afresh."""
        now = self.clock()
        before = self._started.get(group, {})
        current: dict[tuple[int, int], float] = {}
        due = set()
        for row in rows:
            if row["state"] != "revoking":
                continue
            key = (row["partition"], row["epoch"])
            since = current[key] = before.get(key, now)
            drain = drains.get(row["member_id"])
            if row["overdue"] and drain is not None and now - since >= drain:
                due.add(row["partition"])
        self._started[group] = current
        return due

    def revoked(self, group: str, partitions: Iterable[tuple[int, int]]) -> None:
        """We issued these revocations (partition, epoch) just now; one already in progress
        keeps its deadline (the revoke statement keeps it too) and so its start."""
        started = self._started.setdefault(group, {})
        now = self.clock()
        for key in partitions:
            started.setdefault(key, now)

    def forget(self, group: str) -> None:
        """We (again) lead the group after a gap: what we saw before is no evidence."""
        self._started.pop(group, None)
