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

`holds_assignment` is the rule (pure); `AssignmentCheck` keeps the latest expectation,
which the heartbeat's round trip brings along (heartbeat.py) for a member that asks for it
(`Membership.expecting`): no connection or query of its own, and /readyz never waits on one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio


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
    """The latest Expectation of one member, as its heartbeats answer it (`heard`).

    `wake` asks the heartbeat for a round trip now (all it takes to `refresh`)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.expected: Expectation | None = None
        self.member_id: str | None = None  # whom `expected` is about (changes on rejoin)
        self.sent = 0.0  # when the round trip that answered it was sent (monotonic)
        self._heard = anyio.Event()

    def verdict(self, member_id: str, owned: Mapping[int, str]) -> tuple[bool, str]:
        expected = self.expected
        if expected is None or self.member_id != member_id:
            return False, "assignment not checked yet"
        return holds_assignment(owned, expected)

    def heard(self, member_id: str, sent: float, expected: Expectation) -> None:
        """A heartbeat sent at `sent` answered for `member_id` (called by its loop, must not
        block). An answer older than the one kept is dropped."""
        if sent < self.sent:
            return
        self.expected, self.member_id, self.sent = expected, member_id, sent
        self._heard.set()
        self._heard = anyio.Event()

    async def refresh(self, member_id: str, timeout: float = 30.0) -> Expectation:
        """The expectation of `member_id` as of a heartbeat sent from now on (tests, and
        whoever cannot wait for the next interval). TimeoutError if none came by
        `timeout` (heartbeats failing, or the member rejoined as another id)."""
        asked = time.monotonic()
        with anyio.fail_after(timeout):
            while True:
                heard = self._heard
                expected = self.expected
                if expected is not None and self.member_id == member_id and self.sent >= asked:
                    return expected
                self.wake()
                await heard.wait()
