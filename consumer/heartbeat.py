"""One heartbeat for every member of a process: one connection, one loop, and one round
trip per interval that renews them all and answers each one's assignments (and, for a
member whose readiness is judged, what the group expects of it: readiness.py).

Each member stays a member of its own group with its own lease: the round trip renews a
member's lease from the moment it was *sent* (member.py, Lease), and the member applies
that round trip's assignments in the same step, with no await in between, so a lease is
never longer than the view of the assignments it vouches for. A round trip that fails
(the connection dropped, no answer within the round trip timeout) renews nobody: every
member's watchdog self-fences when its own lease runs out, exactly as with a heartbeat
of its own. A member the database no longer knows (expelled) hears so and rejoins; until
it has, it is left out of the round trips.

The connection is dedicated (never pooled) and shared by no other statement: joins and
leaves use connections of their own (member.py), so a slow join never holds up the
renewal of the process's other members.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from pgcg.consumer.member import AssignmentRow
from pgcg.consumer.readiness import Expectation
from pgcg.shared.db import AsyncConn, bounded, connect, translated
from pgcg.shared.errors import Contention, DatabaseUnavailable
from pgcg.shared.loops import Signal
from pgcg.shared.queries import Queries

if TYPE_CHECKING:
    from pgcg.consumer.member import Membership

log = logging.getLogger("pgcg.consumer.member")
Q = Queries("consumer")

# What a round trip answers for one member: its assignments, or None if it was expelled.
Answer = list[AssignmentRow] | None
# A failed round trip, as a member hears of it: the lease was not renewed.
HeartbeatFailure = DatabaseUnavailable | Contention

# PostgreSQL keeps the first 63 bytes of an application_name.
_NAME_BYTES = 63


@dataclass(frozen=True)
class _Subscriber:
    heard: Callable[[Answer], None]  # renewed (its lease already) or expelled
    failed: Callable[[HeartbeatFailure], None]


class Heartbeat:
    """The heartbeat of the members attached to it (`attach`); `run` beats until cancelled.

    `application_name` names the connection in pg_stat_activity (pgcg-member:<groups>).
    """

    def __init__(
        self,
        dsn: str,
        *,
        session_timeout: float,
        interval: float,
        application_name: str = "pgcg-member",
    ) -> None:
        self.dsn = dsn
        self.session_timeout = session_timeout
        self.interval = interval
        self.application_name = application_name.encode()[:_NAME_BYTES].decode(errors="ignore")
        # How long one round trip may take before the connection is taken for dead,
        # dropped and made anew: well within the lease, so a black-holed link (no reset,
        # packets dropped) costs one lease at most, not the kernel's 15 minutes.
        self.round_trip_timeout = max(1.0, session_timeout / 3)
        self.through_pooler = False  # set once the process knows (pooler.py)
        # Set by anyone who wants the assignments read now (a NOTIFY on a group's channel,
        # a write the epoch fence rejected): one early round trip for every member.
        self.wake = Signal()
        self.round_trips = 0  # answered round trips (tests and benchmarks count them)
        self._attached: dict[Membership, _Subscriber] = {}
        self._conn: AsyncConn | None = None
        self._lock = anyio.Lock()  # one statement at a time on the connection

    @staticmethod
    def name_for(groups: Sequence[str]) -> str:
        return "pgcg-member:" + ",".join(sorted(groups))

    # -- members -----------------------------------------------------------------------------

    def attach(
        self,
        membership: Membership,
        heard: Callable[[Answer], None],
        failed: Callable[[HeartbeatFailure], None],
    ) -> None:
        """Renew `membership` from the next round trip on (which comes at once).

        `heard(rows)` is called with its assignments after its lease was renewed, or with
        None when it was expelled; `failed(error)` when a round trip renewed nobody. Both
        are called synchronously by the loop and must not block."""
        self._attached[membership] = _Subscriber(heard, failed)
        self.wake.set()

    def detach(self, membership: Membership) -> None:
        self._attached.pop(membership, None)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Beat every interval (sooner when woken) until cancelled."""
        try:
            while True:
                members = [m for m in self._attached if m.in_group]
                if not members:
                    await self.wake.wait(self.interval)
                    continue
                asked = [(m, m.member_id) for m in members]
                try:
                    sent, answers = await self.round_trip(members)
                except (DatabaseUnavailable, Contention) as exc:
                    for membership, member_id in asked:
                        subscriber = self._current(membership, member_id)
                        if subscriber is not None:
                            subscriber.failed(exc)
                    await self.wake.wait(min(1.0, self.interval))
                    continue
                for membership, member_id in asked:
                    # Detached, or rejoined as another member id, while the answer came.
                    subscriber = self._current(membership, member_id)
                    if subscriber is None:
                        continue
                    rows = answers[(membership.group, member_id)]
                    # Lease and assignments together: nothing may run in between.
                    if rows is not None and not membership.renewed(sent):
                        continue  # a newer answer was applied already
                    subscriber.heard(rows)
                await self.wake.wait(self.interval)
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    def _current(self, membership: Membership, member_id: str) -> _Subscriber | None:
        if membership.member_id != member_id:
            return None
        return self._attached.get(membership)

    async def round_trip(
        self, members: Sequence[Membership]
    ) -> tuple[float, dict[tuple[str, str], Answer]]:
        """Renew `members` in one statement: when it was sent, and each one's answer by
        (group, member id). Leases are the caller's to renew (Membership.renewed), in the
        same step as it applies the assignments."""
        asked = [(m, m.member_id) for m in members]
        pairs = sorted({(m.group, member_id) for m, member_id in asked})
        params = {"groups": [g for g, _ in pairs], "members": [m for _, m in pairs]}
        # Readiness rides along (readiness.py) when a member asks for it.
        query = (
            Q.heartbeat_members_expecting
            if any(m.expecting is not None for m in members)
            else Q.heartbeat_members
        )
        async with self._lock:
            try:
                conn = await self._connection()
                sent = time.monotonic()

                async def call() -> list[dict[str, Any]]:
                    with translated(self.dsn):
                        cur = await conn.execute(query, params)
                        return await cur.fetchall()

                rows = await bounded(conn, self.round_trip_timeout, call)
            except DatabaseUnavailable:
                await self._drop_connection()
                raise
        self.round_trips += 1
        answers: dict[tuple[str, str], Answer] = dict.fromkeys(pairs)
        expected: dict[tuple[str, str], Expectation] = {}
        for row in rows:
            if not row["alive"]:
                continue
            key = (row["group"], row["member"])
            got = answers[key]
            if got is None:
                got = answers[key] = []
                if row.get("e_partitions") is not None:
                    expected[key] = Expectation(
                        partitions=int(row["e_partitions"]),
                        members=int(row["e_members"]),
                        assigned=frozenset(row["e_assigned"]),
                        incoming=frozenset(row["e_incoming"]),
                    )
            if row["partition"] is not None:
                got.append(
                    AssignmentRow(row["partition"], row["epoch"], row["state"], row["revoke_in"])
                )
        for membership, member_id in asked:
            check = membership.expecting
            expectation = expected.get((membership.group, member_id))
            if check is not None and expectation is not None:
                check.heard(member_id, sent, expectation)
        return sent, answers

    # -- the connection ------------------------------------------------------------------------

    async def _connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.dsn,
                application_name=self.application_name,
                through_pooler=self.through_pooler,
                session_timeout=self.session_timeout,
            )
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        await self._drop_connection()
