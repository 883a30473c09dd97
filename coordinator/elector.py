"""Leader election, per group: an advisory lock on a dedicated session, and a leader row
whose epoch fences every write the leader makes.

The lock alone does not fence: a paused leader keeps its connection and its lock. So the
leader renews a heartbeat in its row; a standby that sees the heartbeat older than the
leader timeout terminates the silent leader's backend, which frees the lock, and takes
over with the epoch bumped. The old leader, when it wakes, finds its connection gone or
its epoch stale, and writes nothing.

Winning an election, deposing a silent leader and stepping down are each a span
(`pgcg leader election`, `pgcg leader depose`, `pgcg leader step_down`); rounds that
change nothing emit none.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio

from pgcg.shared import tracing
from pgcg.shared.db import AsyncConn, bounded, connect, translated
from pgcg.shared.errors import DatabaseUnavailable, PermissionDenied
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.coordinator.elector")
Q = Queries("coordinator")

# Advisory lock namespace (first key of the two-key form); the second is hashtext(group).
LOCK_CLASS = 0x7067
# Seconds to wait for a terminated leader's session to end before trying its lock again;
# past it, the next election round tries.
TERMINATION_WAIT = 1.0


def new_leader_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Leadership:
    group: str
    epoch: int
    renewed_sent_at: float  # monotonic time the last successful renewal was sent


class Elector:
    """Holds the coordinator's one dedicated session: the advisory locks live on it, and
    the rebalancer's writes run on it too, so terminating it stops both at once."""

    def __init__(self, dsn: str, *, leader_timeout: float, leader_id: str | None = None) -> None:
        self.dsn = dsn
        self.leader_timeout = leader_timeout
        self.margin = max(1.0, leader_timeout * 0.2)
        self.leader_id = leader_id or new_leader_id()
        self.conn_lock = anyio.Lock()
        self._conn: AsyncConn | None = None
        self._leading: dict[str, Leadership] = {}
        self._standing_by: set[str] = set()
        self._refused: set[tuple[Any, ...]] = set()  # depose refusals already logged

    @property
    def fields(self) -> dict[str, Any]:
        return {"leader_id": self.leader_id}

    @property
    def connected(self) -> bool:
        """Whether the coordinator session is up (readiness: leader or standby)."""
        return self._conn is not None and not self._conn.closed

    async def connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            if self._leading:
                log.error(
                    "coordinator session lost: no longer leader of %s",
                    sorted(self._leading),
                    extra={"action": "leader_lost", **self.fields},
                )
            self._leading.clear()  # the locks died with the old session
            self._conn = await connect(
                self.dsn, application_name="pgcg-coordinator", session_timeout=self.leader_timeout
            )
        return self._conn

    async def close(self) -> None:
        async with self.conn_lock:
            if self._conn is not None and not self._conn.closed:
                for group in list(self._leading):
                    await self._step_down(group, "shutdown")
                await self._conn.close()
            self._conn = None
            self._leading.clear()

    def leader_epoch(self, group: str, now: float | None = None) -> int | None:
        """Our leader epoch for `group` if we may act as its leader right now.

        Trusted only until the last renewal + leader timeout - margin (monotonic): past
        that a standby may already have taken over.
        """
        lead = self._leading.get(group)
        if lead is None:
            return None
        now = time.monotonic() if now is None else now
        if now > lead.renewed_sent_at + self.leader_timeout - self.margin:
            return None
        return lead.epoch

    def leading(self) -> list[str]:
        return [g for g in self._leading if self.leader_epoch(g) is not None]

    async def tick(self, groups: list[str]) -> list[str]:
        """One election round over `groups`; returns the groups we newly lead."""
        elected: list[str] = []
        async with self.conn_lock:
            try:
                conn = await self.connection()

                async def round_() -> None:
                    for group in groups:
                        if group in self._leading:
                            await self._renew(conn, group)
                        elif await self._try_lead(conn, group):
                            elected.append(group)
                    for group in [g for g in self._leading if g not in groups]:
                        await self._step_down(group, "group gone")

                # A round that outlasts the leadership it renews is on a dead connection
                # (packets dropped, no reset): drop it and start over on a new one.
                await bounded(conn, self.leader_timeout - self.margin, round_)
            except DatabaseUnavailable as exc:
                if self._leading:
                    log.error(
                        "lost the coordinator connection: stepping down from %s (%s)",
                        sorted(self._leading),
                        exc,
                        extra={"action": "leader_lost", **self.fields},
                    )
                self._leading.clear()
                if self._conn is not None:
                    await self._conn.close()
                self._conn = None
        return elected

    def _params(self, group: str, **extra: Any) -> dict[str, Any]:
        return {
            "scope": group,
            "leader": self.leader_id,
            "lock_class": LOCK_CLASS,
            "leader_timeout_s": self.leader_timeout,
            **extra,
        }

    async def _renew(self, conn: AsyncConn, group: str) -> None:
        lead = self._leading[group]
        sent = time.monotonic()
        with translated(self.dsn):
            row = await (
                await conn.execute(Q.leader_heartbeat, self._params(group, leader_epoch=lead.epoch))
            ).fetchone()
        if row is None:
            log.error(
                "leadership of %s lost (epoch %s moved on or heartbeat too old): stepping down",
                group,
                lead.epoch,
                extra={"action": "leader_deposed", "group": group,
                       "leader_epoch": lead.epoch, **self.fields},
            )  # fmt: skip
            await self._step_down(group, "deposed")
            return
        lead.renewed_sent_at = sent

    async def _try_lead(self, conn: AsyncConn, group: str) -> bool:
        params = self._params(group)
        with translated(self.dsn):
            await conn.execute(Q.ensure_leader_row, params)
            if not await self._try_lock(conn, params):
                if group not in self._standing_by:
                    self._standing_by.add(group)
                    log.info(
                        "standing by for group %s",
                        group,
                        extra={"action": "standby", "group": group, **self.fields},
                    )
                # The silent leader's lock ends with its session: take it in this round
                # rather than an election interval later.
                if not await self._depose_if_silent(conn, group):
                    return False
                if not await self._try_lock(conn, params):
                    return False
            self._standing_by.discard(group)
            with tracing.event_span(
                "pgcg leader election", {"group": group}, **{"pgcg.leader_id": self.leader_id}
            ) as span:
                sent = time.monotonic()
                row = await (await conn.execute(Q.take_leadership, params)).fetchone()
                assert row is not None
                span.set_attribute("pgcg.leader_epoch", int(row["leader_epoch"]))
                self._leading[group] = Leadership(group, int(row["leader_epoch"]), sent)
                log.info(
                    "elected leader of group %s at leader epoch %s",
                    group,
                    row["leader_epoch"],
                    extra={"action": "leader_elected", "group": group,
                           "leader_epoch": row["leader_epoch"], **self.fields},
                )  # fmt: skip
        return True

    async def _try_lock(self, conn: AsyncConn, params: dict[str, Any]) -> bool:
        row = await (await conn.execute(Q.try_lock, params)).fetchone()
        return bool(row and row["locked"])

    async def _depose_if_silent(self, conn: AsyncConn, group: str) -> bool:
        """Terminate the session of a leader silent past the timeout; True once it ended.

        Only a backend that holds the group's leader lock is terminated, whatever pid the
        leader row names; and terminating another role's backend needs that role's
        privileges or pg_signal_backend: without them this coordinator stays a standby
        and says so, it does not crash.
        """
        stale = await (await conn.execute(Q.stale_leader, self._params(group))).fetchone()
        if stale is None:
            return False
        pid = stale["backend_pid"]
        with tracing.event_span(
            "pgcg leader depose",
            {"group": group},
            **{"pgcg.leader_id": self.leader_id, "pgcg.silent_leader": stale["leader_id"],
               "pgcg.leader_epoch": stale["leader_epoch"], "pgcg.silent_s": stale["silent_s"]},
        ):  # fmt: skip
            fields = {"group": group, "leader_epoch": stale["leader_epoch"],
                      "silent_leader": stale["leader_id"], "backend_pid": pid,
                      **self.fields}  # fmt: skip
            try:
                with translated(self.dsn):
                    row = await (
                        await conn.execute(
                            Q.terminate_leader_backend,
                            self._params(group, pid=pid, wait_ms=round(TERMINATION_WAIT * 1000)),
                        )
                    ).fetchone()
            except PermissionDenied as exc:
                self._once(
                    (group, pid, "denied"),
                    "cannot depose the silent leader %s of group %s: %s",
                    stale["leader_id"], group, exc,
                    extra={"action": "leader_depose_denied", **fields},
                )  # fmt: skip
                return False
            if row is None:
                self._once(
                    (group, pid, "no lock"),
                    "leader row of group %s names backend %s, which does not hold the "
                    "group's leader lock: not terminating it",
                    group, pid,
                    extra={"action": "leader_pid_mismatch", **fields},
                )  # fmt: skip
                return False
            log.warning(
                "leader %s of group %s silent for %.1fs: terminated its session",
                stale["leader_id"],
                group,
                stale["silent_s"],
                extra={"action": "leader_terminated", **fields},
            )
        return bool(row["terminated"])

    def _once(self, what: tuple[Any, ...], message: str, *args: Any, extra: dict[str, Any]) -> None:
        """Log a refusal at error once; the election retries every round, so afterwards
        the same refusal is only debug."""
        level = logging.DEBUG if what in self._refused else logging.ERROR
        self._refused.add(what)
        log.log(level, message, *args, extra=extra)

    async def resign(self, group: str, reason: str) -> None:
        async with self.conn_lock:
            await self._step_down(group, reason)

    async def _step_down(self, group: str, reason: str) -> None:
        lead = self._leading.pop(group, None)
        if lead is None or self._conn is None or self._conn.closed:
            return
        with tracing.event_span(
            "pgcg leader step_down",
            {"group": group},
            **{"pgcg.leader_id": self.leader_id, "pgcg.leader_epoch": lead.epoch,
               "pgcg.reason": reason},
        ):  # fmt: skip
            try:
                with translated(self.dsn):
                    await self._conn.execute(Q.unlock, self._params(group))
            except DatabaseUnavailable:
                pass  # the lock went with the session
            log.info(
                "stepped down as leader of %s (%s)",
                group,
                reason,
                extra={"action": "leader_stepped_down", "group": group,
                       "leader_epoch": lead.epoch, **self.fields},
            )  # fmt: skip
