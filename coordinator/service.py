"""A coordinator process: elects itself leader of the groups it can, rebalances them.

Loops (one task group): elector (every second), listener (joins, leaves and releases
NOTIFY us; a hint only), topic upkeep (retention.py, every topic, every
maintenance interval), sweeper (expire members and force overdue hand-offs every
heartbeat interval, and a lock-free probe for expired members every 0.25 s in between;
full safety-net rebalance every rebalance interval), rebalancer
(works through the groups marked dirty by the others, one transaction each).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from typing import Any

import anyio
from anyio.abc import TaskGroup
from psycopg import sql

from pgcg.coordinator.drains import DrainWatch
from pgcg.coordinator.elector import Elector
from pgcg.coordinator.expiry import Clock, MemberWatch
from pgcg.coordinator.rebalancer import (
    DEFAULT_LOCK_TIMEOUT,
    LostLeadership,
    Outcome,
    rebalance,
)
from pgcg.coordinator.retention import Retention
from pgcg.shared import names, pooler, taskdump
from pgcg.shared.db import AsyncConn, bounded, connect, translated
from pgcg.shared.errors import ConfigError, DatabaseUnavailable
from pgcg.shared.loops import Signal, reconnecting
from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings

log = logging.getLogger("pgcg.coordinator")
Q = Queries("coordinator")

ELECTION_INTERVAL = 1.0
# Between full sweeps (every heartbeat interval), how often the leader asks whether a
# member of its groups is past its session timeout.
EXPIRY_PROBE_INTERVAL = 0.25


class Coordinator:
    def __init__(
        self,
        settings: Settings,
        *,
        groups: list[str] | None = None,
        dsn: str | None = None,
        clock: Clock = time.monotonic,
        drains: DrainWatch | None = None,
    ) -> None:
        """`clock`: the monotonic clock members' silences and revocations' drains are
        timed on. `drains`: what decides when a drain deadline has passed (drains.py)."""
        self.settings = settings
        # Members are expired on this clock (expiry.py), never on the database's; hand-offs
        # are forced only once a drain has run its course on it as well (drains.py).
        self.watch = MemberWatch(clock)
        self.drains = drains if drains is not None else DrainWatch(clock)
        self.dsn = dsn or settings.dsn()
        self.only = [names.group_name(g) for g in groups] if groups else None
        # The leader lock and LISTEN need a session: PGCG_SESSION_DATABASE_URL when
        # self.dsn goes through a transaction pooler (decided in run(), see pooler.py).
        self.session_dsn = self.dsn
        self.through_pooler = False
        self.elector = Elector(self.dsn, leader_timeout=settings.leader_timeout)
        # How long anything on the leader's session may wait for an answer: past this its
        # leadership has lapsed anyway, and the connection is taken for dead (elector.py).
        self.round_trip_timeout = settings.leader_timeout - self.elector.margin
        self.retention = Retention(
            self.dsn, settings.maintenance_interval, {"leader_id": self.elector.leader_id}
        )
        self.topics: dict[str, str] = {}  # group -> topic
        self.dirty: dict[str, str] = {}  # group -> reason of the pending rebalance
        self.wake = Signal()
        self.outcomes: list[Outcome] = []  # recent history, for tests and the demo
        self.ready = anyio.Event()
        self._stopped = anyio.Event()
        self._tg: TaskGroup | None = None

    @property
    def leader_id(self) -> str:
        return self.elector.leader_id

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        # Fail fast, with the one-line error, on a missing schema or a wrong URL.
        await self._route()
        await self._refresh_groups()
        log.info(
            "coordinator started",
            extra={"action": "coordinator_started", "leader_id": self.leader_id,
                   "groups": self.only or "all"},
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if install_signal_handlers:
                tg.start_soon(self._signals)
                taskdump.install()
            tg.start_soon(self._election_loop)
            tg.start_soon(self._listener_loop)
            tg.start_soon(self._sweep_loop)
            tg.start_soon(self._rebalance_loop)
            tg.start_soon(self.retention.run)
            await self._stopped.wait()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self.elector.close()
        log.info("coordinator stopped", extra={"action": "coordinator_stopped",
                                               "leader_id": self.leader_id})  # fmt: skip

    async def _route(self) -> None:
        route = await pooler.route(self.settings, self.dsn)
        if route.session_dsn is None:
            raise ConfigError(
                "PGCG_DATABASE_URL goes through a transaction pooler, where the leader's "
                "advisory lock would stay behind on a server connection other clients use: "
                "set PGCG_SESSION_DATABASE_URL to a direct URL of the same database"
            )
        self.through_pooler = route.pooled
        self.session_dsn = self.elector.dsn = route.session_dsn
        self.retention.through_pooler = self.through_pooler

    async def run_until_stopped(self) -> None:
        await self.run(install_signal_handlers=False)

    async def stop(self) -> None:
        self._stopped.set()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for _ in received:
                log.info("stopping", extra={"action": "shutdown_requested",
                                            "leader_id": self.leader_id})  # fmt: skip
                self._stopped.set()

    def mark(self, group: str, reason: str) -> None:
        if group not in self.dirty:
            self.dirty[group] = reason
        self.wake.set()

    # -- loops -----------------------------------------------------------------------------

    async def _election_loop(self) -> None:
        while True:
            try:
                await self._refresh_groups()
            except DatabaseUnavailable as exc:
                log.warning("cannot list groups: %s", exc, extra={"action": "db_retry"})
            for group in await self.elector.tick(sorted(self.topics)):
                self.watch.forget(group)
                self.drains.forget(group)
                self.mark(group, "leader elected")
            self.ready.set()
            await anyio.sleep(ELECTION_INTERVAL)

    async def _refresh_groups(self) -> None:
        async with self.elector.conn_lock:
            conn = await self.elector.connection()

            async def read() -> list[dict[str, Any]]:
                with translated(self.session_dsn):
                    return await (await conn.execute(Q.groups)).fetchall()

            rows = await bounded(conn, self.round_trip_timeout, read)
        self.topics = {
            r["group_name"]: r["topic"]
            for r in rows
            if self.only is None or r["group_name"] in self.only
        }

    async def _listener_loop(self) -> None:
        while True:
            conn: AsyncConn | None = None
            try:
                async for attempt in reconnecting(log, "coordinator listen"):
                    with attempt:
                        conn = await connect(
                            self.session_dsn,
                            application_name="pgcg-coord-listen",
                            session_timeout=self.settings.leader_timeout,
                        )
                        with translated(self.session_dsn):
                            await conn.execute(
                                sql.SQL("LISTEN {}").format(
                                    sql.Identifier(names.COORDINATOR_CHANNEL)
                                )
                            )
                # Catch up on whatever happened while we were not listening.
                for group in self.elector.leading():
                    self.mark(group, "listener reconnected")
                assert conn is not None
                with translated(self.session_dsn):
                    async with contextlib.aclosing(conn.notifies()) as notifies:
                        async for note in notifies:
                            self._on_notify(note.payload)
            except DatabaseUnavailable as exc:
                log.warning("listener lost: %s", exc, extra={"action": "listen_lost"})
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await conn.close()

    def _on_notify(self, payload: str) -> None:
        # Any role that can connect may NOTIFY on this channel: a payload is a hint to
        # look at a group (the rebalance reads the truth), and one that is not ours is
        # ignored rather than allowed to break the loop.
        try:
            event = json.loads(payload)
            group, kind, member = event["group"], event["event"], event.get("member")
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if not (isinstance(group, str) and isinstance(kind, str)):
            return
        member = member if isinstance(member, str) else None
        self.mark(group, f"member {kind}" + (f" ({member})" if member else ""))

    async def _sweep_loop(self) -> None:
        last_full = last_sweep = time.monotonic()
        while True:
            await anyio.sleep(min(EXPIRY_PROBE_INTERVAL, self.settings.heartbeat_interval))
            if time.monotonic() - last_sweep < self.settings.heartbeat_interval:
                for group in await self._expired_groups():
                    self.mark(group, "expiry probe")
                continue
            last_sweep = time.monotonic()
            full = time.monotonic() - last_full >= self.settings.rebalance_interval
            if full:
                last_full = time.monotonic()
            for group in self.elector.leading():
                self.mark(group, "periodic" if full else "sweep")

    async def _expired_groups(self) -> list[str]:
        """Groups we lead with a member silent for its session timeout (a hint: the
        rebalance decides the expiry itself). Lock-free and cheap (members only); asked
        between full sweeps, it is also how often members' heartbeats are watched."""
        leading = self.elector.leading()
        if not leading:
            return []
        try:
            async with self.elector.conn_lock:
                conn = await self.elector.connection()

                async def read() -> list[dict[str, Any]]:
                    with translated(self.session_dsn):
                        cur = await conn.execute(Q.member_heartbeats, {"groups": leading})
                        return await cur.fetchall()

                rows = await bounded(conn, self.round_trip_timeout, read)
        except DatabaseUnavailable:
            return []  # the election loop deals with the session; the next probe retries
        by_group: dict[str, list[dict[str, object]]] = {g: [] for g in leading}
        for row in rows:
            by_group.setdefault(str(row["group_name"]), []).append(row)
        return [group for group, members in by_group.items() if self.watch.observe(group, members)]

    async def _rebalance_loop(self) -> None:
        while True:
            await self.wake.wait(None)
            while self.dirty:
                group, reason = next(iter(self.dirty.items()))
                del self.dirty[group]
                await self.rebalance_group(group, reason)

    async def rebalance_group(self, group: str, reason: str) -> Outcome | None:
        epoch = self.elector.leader_epoch(group)
        if epoch is None:
            return None
        topic = self.topics.get(group)
        if topic is None:
            await self._refresh_groups()
            topic = self.topics.get(group)
            if topic is None:
                return None
        try:
            async with self.elector.conn_lock:
                conn = await self.elector.connection()
                outcome = await bounded(
                    conn,
                    self.round_trip_timeout,
                    lambda: rebalance(
                        conn,
                        group=group,
                        topic=topic,
                        leader_id=self.leader_id,
                        leader_epoch=epoch,
                        leader_timeout=self.settings.leader_timeout,
                        drain_deadline=self.settings.drain_deadline,
                        reason=reason,
                        lock_timeout=min(DEFAULT_LOCK_TIMEOUT, self.settings.lease_margin / 2),
                        idle_timeout=self.settings.lease_margin,
                        watch=self.watch,
                        drains=self.drains,
                    ),
                )
        except LostLeadership as exc:
            log.error(
                "%s: stepping down",
                exc,
                extra={"action": "leader_deposed", "group": group, "leader_epoch": epoch},
            )
            await self.elector.resign(group, "deposed")
            return None
        except DatabaseUnavailable as exc:
            log.warning("rebalance of %s failed: %s", group, exc,
                        extra={"action": "rebalance_failed", "group": group})  # fmt: skip
            self.mark(group, reason)
            await anyio.sleep(0.5)
            return None
        if outcome is not None:
            self.outcomes = [*self.outcomes[-99:], outcome]
        return outcome
