"""When a consumer counts as ready: it holds its assignment, or the group has nothing for it.

Joined with a valid lease is not enough. A Deployment rolls on readiness: a member that is
ready the moment it joins lets the controller stop the next old pod while the partitions
meant for the new one are still draining elsewhere, and a rolling update turns into a
cascade of hand-offs. So readiness compares what this member owns (in memory) with what
the database expects of it:

  - no partition is on its way to it (revoking from another owner, with it as target);
  - every partition the database assigns to it, it has started on;
  - it holds at least partitions // live members of them: the assignor gives every live
    member that many, so a member below it is still waiting for its first rebalance.
    More members than partitions makes that 0: the group has nothing for it, and an idle
    standby is ready.

`holds_assignment` is the rule (pure); `AssignmentCheck` reads the expectation from the
database every heartbeat interval on its own connection, so /readyz never waits on a query.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.loops import refresh_forever
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.consumer.readiness")
Q = Queries("readiness")


@dataclass(frozen=True)
class Expectation:
    """The database's side, for one member at one moment."""

    partitions: int  # of the group
    members: int  # live members of the group, this one included
    assigned: frozenset[int]  # assigned to this member
    incoming: frozenset[int]  # revoking from another owner, this member the target

    @property
    def share(self) -> int:
        """The fewest partitions the assignor gives any live member."""
        return self.partitions // max(self.members, 1)


def holds_assignment(owned: Mapping[int, str], expected: Expectation) -> tuple[bool, str]:
    """Ready, and why: `owned` maps each partition this member works on to its state."""
    held = {p for p, state in owned.items() if state == "assigned"}
    if expected.incoming:
        return False, f"waiting for partitions {sorted(expected.incoming)} to be handed over"
    not_started = expected.assigned - held
    if not_started:
        return False, f"assigned partitions {sorted(not_started)}, not started on them yet"
    holding = len(held & expected.assigned)
    if holding < expected.share:
        return False, (
            f"holds {holding} of at least {expected.share} partitions "
            f"({expected.partitions} over {expected.members} members): waiting for a rebalance"
        )
    if not holding:
        return True, (
            f"nothing to hold: {expected.members} members for {expected.partitions} partitions"
        )
    return True, f"holds its {holding} partition(s)"


class AssignmentCheck:
    """The latest Expectation of one member; `run` refreshes it until cancelled."""

    def __init__(self, dsn: str, group: str, interval: float) -> None:
        self.dsn = dsn
        self.group = group
        self.interval = interval
        self.expected: Expectation | None = None
        self.member_id: str | None = None  # whom `expected` is about (changes on rejoin)
        self._conn: AsyncConn | None = None

    def verdict(self, member_id: str, owned: Mapping[int, str]) -> tuple[bool, str]:
        expected = self.expected
        if expected is None or self.member_id != member_id:
            return False, "assignment not checked yet"
        return holds_assignment(owned, expected)

    async def run(self, member_id: Callable[[], str]) -> None:
        """Refresh every interval for whoever `member_id()` is then; cancel to stop."""

        async def refresh() -> None:
            await self.refresh(member_id())

        await refresh_forever(refresh, self._drop, self.interval, log)

    async def refresh(self, member_id: str) -> Expectation:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(self.dsn, application_name="pgcg-readiness")
        with translated(self.dsn):
            cur = await self._conn.execute(
                Q.member_expectation, {"group": self.group, "member": member_id}
            )
            row = await cur.fetchone()
        assert row is not None  # an aggregate-only SELECT always answers one row
        self.expected = Expectation(
            partitions=int(row["partitions"]),
            members=int(row["members"]),
            assigned=frozenset(row["assigned"]),
            incoming=frozenset(row["incoming"]),
        )
        self.member_id = member_id
        return self.expected

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
