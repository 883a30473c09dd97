"""Group membership: join, heartbeat on a dedicated connection, the lease, and leave."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pgcg.shared import names
from pgcg.shared.db import AsyncConn, bounded, connect, translated
from pgcg.shared.errors import DatabaseUnavailable, UnknownTopic
from pgcg.shared.queries import Queries

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
    """One member's row in consumer_groups; `member_id` changes when it has to rejoin."""

    def __init__(
        self, dsn: str, group: str, topic: str, *, session_timeout: float, lease_margin: float
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
        # How long one heartbeat round trip may take before the connection is taken for
        # dead, dropped and made anew: well within the lease, so a black-holed link (no
        # reset, packets dropped) costs one lease at most, not the kernel's 15 minutes.
        self.round_trip_timeout = max(1.0, session_timeout / 3)
        self._conn: AsyncConn | None = None
        self.through_pooler = False  # set by the consumer once it knows (pooler.py)

    @property
    def fields(self) -> dict[str, Any]:
        return {"group": self.group, "member_id": self.member_id, "topic": self.topic}

    async def _connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.dsn,
                application_name=f"pgcg-member:{self.group}",
                through_pooler=self.through_pooler,
                session_timeout=self.session_timeout,
            )
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def join(self, *, rejoin: bool = False) -> None:
        """Insert our member row (creating the group on first use)."""
        if rejoin:
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

        try:
            conn = await self._connection()
            await bounded(conn, self.session_timeout, insert)
        except DatabaseUnavailable:
            await self._drop_connection()
            raise
        self.lease.renewed(sent)
        log.info(
            "joined group %s as %s",
            self.group,
            self.member_id,
            extra={"action": "member_joined", **self.fields, "rejoin": rejoin},
        )

    async def heartbeat(self) -> list[AssignmentRow] | None:
        """Renew the lease; our assignments, or None if we were expelled from the group."""
        try:
            conn = await self._connection()
            sent = time.monotonic()

            async def round_trip() -> list[dict[str, Any]]:
                with translated(self.dsn):
                    params = {"group": self.group, "member": self.member_id}
                    return await (await conn.execute(Q.heartbeat, params)).fetchall()

            rows = await bounded(conn, self.round_trip_timeout, round_trip)
        except DatabaseUnavailable:
            await self._drop_connection()
            raise
        if not rows or not rows[0]["alive"]:
            return None
        self.lease.renewed(sent)
        self.answered_sent_at = sent
        return [
            AssignmentRow(r["partition"], r["epoch"], r["state"], r["revoke_in"])
            for r in rows
            if r["partition"] is not None
        ]

    async def leave(self) -> None:
        params = {"group": self.group, "member": self.member_id, "event": "leave"}
        conn = await self._connection()
        with translated(self.dsn):
            async with conn.transaction():
                await conn.execute(Q.leave, params)
                await conn.execute(Q.notify_coordinator, params)
        self.lease.expire()
        log.info("left group %s", self.group, extra={"action": "member_left", **self.fields})

    async def close(self) -> None:
        await self._drop_connection()
