"""Group membership: join, the lease, heartbeats (through the process's shared heartbeat,
heartbeat.py), and leave."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgcg.shared import names
from pgcg.shared.db import AsyncConn, bounded, connect, translated
from pgcg.shared.errors import UnknownTopic
from pgcg.shared.queries import Queries

if TYPE_CHECKING:
    from pgcg.consumer.heartbeat import Heartbeat
    from pgcg.consumer.readiness import AssignmentCheck

log = logging.getLogger("pgcg.consumer.member")
Q = Queries("consumer")


def new_member_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class AssignmentRow:
    partition: int
    epoch: int
    state: str
    revoke_in: float | None  # seconds until the leader forces the hand-off


class Lease:
    """How long this member may trust what it owns, on its own monotonic clock.

    The database expires a member `session_timeout` after its last heartbeat *arrived*;
    we count from when the heartbeat was *sent* and subtract a margin, so the member
    always stops before anyone else can be given its partitions.
    """

    def __init__(self, session_timeout: float, margin: float) -> None:
        self.session_timeout = session_timeout
        self.margin = margin
        self.until = 0.0

    def renewed(self, sent_at: float) -> None:
        self.until = sent_at + self.session_timeout - self.margin

    def valid(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.until

    def remaining(self, now: float | None = None) -> float:
        return self.until - (time.monotonic() if now is None else now)

    def expire(self) -> None:
        self.until = 0.0


class Membership:
    """One member's row in consumer_groups; `member_id` changes when it has to rejoin.

    Its heartbeats go through `heartbeats` (heartbeat.py), which this process's other members
    may share; joins and leaves use a connection of their own for each, so that a slow one
    never holds up the renewal of the others."""

    def __init__(
        self,
        dsn: str,
        group: str,
        topic: str,
        *,
        session_timeout: float,
        lease_margin: float,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.dsn = dsn
        self.group = names.group_name(group)
        self.topic = names.topic_name(topic)
        self.session_timeout = session_timeout
        self.member_id = new_member_id()
        self.lease = Lease(session_timeout, lease_margin)
        # When the last answered heartbeat was sent: the database computed its deadlines
        # (revoke_in) from its own clock at about then, so they count from here, not from
        # whenever the answer arrived.
        self.answered_sent_at = 0.0
        self.partitions = 0
        # Joined and not known to be expelled or gone: the heartbeat renews only such.
        self.in_group = False
        self.through_pooler = False  # set by the consumer once it knows (pooler.py)
        # Set by whoever judges readiness (observer.py): the heartbeats then bring along
        # what the group expects of this member, and hand it over here.
        self.expecting: AssignmentCheck | None = None
        self._owns_heartbeat = heartbeat is None
        if heartbeat is None:
            from pgcg.consumer.heartbeat import Heartbeat

            # A heartbeat of its own, beaten by whoever uses this member alone.
            heartbeat = Heartbeat(
                dsn,
                session_timeout=session_timeout,
                interval=session_timeout / 3,
                application_name=Heartbeat.name_for([self.group]),
            )
        self.heartbeats = heartbeat

    @property
    def fields(self) -> dict[str, Any]:
        return {"group": self.group, "member_id": self.member_id, "topic": self.topic}

    def share(self, heartbeat: Heartbeat) -> None:
        """Heartbeat through `heartbeat` (a process's, shared) instead of one of its own."""
        self.heartbeats = heartbeat
        self._owns_heartbeat = False

    async def _connect(self, purpose: str) -> AsyncConn:
        return await connect(
            self.dsn,
            application_name=f"pgcg-{purpose}:{self.group}",
            through_pooler=self.through_pooler,
            session_timeout=self.session_timeout,
        )

    async def join(self, *, rejoin: bool = False) -> None:
        """Insert our member row (creating the group on first use)."""
        if rejoin:
            self.in_group = False
            self.member_id = new_member_id()
        params = {
            "group": self.group,
            "topic": self.topic,
            "member": self.member_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "session_timeout_ms": round(self.session_timeout * 1000),
            "event": "join",
        }
        sent = 0.0

        async def insert() -> None:
            nonlocal sent
            with translated(self.dsn):
                async with conn.transaction():
                    row = await (await conn.execute(Q.topic_partitions, params)).fetchone()
                    if row is None:
                        raise UnknownTopic(
                            f"unknown topic {self.topic!r}: create it with "
                            f"`pgcg topic create {self.topic}`"
                        )
                    self.partitions = int(row["partitions"])
                    params["partitions"] = self.partitions
                    # A group that does not exist yet starts at the earliest message; one
                    # of another topic is refused (a group consumes one topic).
                    await conn.execute(Q.create_group, params)
                    sent = time.monotonic()
                    await conn.execute(Q.join, params)
                    await conn.execute(Q.notify_coordinator, params)

        conn = await self._connect("join")
        try:
            await bounded(conn, self.session_timeout, insert)
        finally:
            await conn.close()
        self.lease.renewed(sent)
        self.answered_sent_at = max(self.answered_sent_at, sent)
        self.in_group = True
        log.info(
            "joined group %s as %s",
            self.group,
            self.member_id,
            extra={"action": "member_joined", **self.fields, "rejoin": rejoin},
        )

    def renewed(self, sent: float) -> bool:
        """A heartbeat sent at `sent` found us in the group: renew the lease from then.
        False (nothing renewed) when a later one was answered already: its view stands."""
        if sent < self.answered_sent_at:
            return False
        self.lease.renewed(sent)
        self.answered_sent_at = sent
        return True

    async def heartbeat(self) -> list[AssignmentRow] | None:
        """One heartbeat of this member alone, now (the loop of heartbeat.py renews it on
        its own cadence): our assignments, or None if we were expelled from the group.
        Apply them before the next await: the lease was renewed for them."""
        sent, answers = await self.heartbeats.round_trip([self])
        rows = answers[(self.group, self.member_id)]
        if rows is None:
            return None
        self.renewed(sent)
        return rows

    async def leave(self) -> None:
        params = {"group": self.group, "member": self.member_id, "event": "leave"}
        conn = await self._connect("leave")
        try:
            with translated(self.dsn):
                async with conn.transaction():
                    await conn.execute(Q.leave, params)
                    await conn.execute(Q.notify_coordinator, params)
        finally:
            await conn.close()
        self.in_group = False
        self.lease.expire()
        log.info("left group %s", self.group, extra={"action": "member_left", **self.fields})

    async def close(self) -> None:
        self.heartbeats.detach(self)
        if self._owns_heartbeat:
            await self.heartbeats.close()
