"""When a member has been silent for its session timeout, timed on the coordinator's own
clock.

The database's clock is not trusted for this: comparing last_heartbeat with now() expires
every member at once when the database host's clock steps forward, while their leases
(timed on their own monotonic clocks) are still valid and they keep working. Instead the
leader watches each member's last_heartbeat as a value: a member is silent from the first
moment (on the leader's monotonic clock) it saw the current value, and expires once that
is a session timeout ago. A leader that has just taken over has seen nobody yet, so it
waits a full session timeout before expiring anyone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

Clock = Callable[[], float]


class MemberWatch:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        # group -> member -> (the last_heartbeat value seen, when it was first seen)
        self._seen: dict[str, dict[str, tuple[Any, float]]] = {}

    def observe(self, group: str, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record the group's members (member_id, last_heartbeat, session_timeout_ms) as
        they are now; the rows of those silent for their session timeout."""
        now = self.clock()
        before = self._seen.get(group, {})
        current: dict[str, tuple[Any, float]] = {}
        silent = []
        for row in rows:
            seen = before.get(row["member_id"])
            since = seen[1] if seen is not None and seen[0] == row["last_heartbeat"] else now
            current[row["member_id"]] = (row["last_heartbeat"], since)
            if now - since >= row["session_timeout_ms"] / 1000:
                silent.append(row)
        self._seen[group] = current
        return silent

    def forget(self, group: str) -> None:
        """We (again) lead the group after a gap: what we saw before is no evidence."""
        self._seen.pop(group, None)
