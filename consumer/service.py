"""One consumer member: wires membership, reader, scheduler, writer and handlers together,
and owns shutdown.

Loops (all in one task group, all cancellable):
  heartbeat  renew the lease, read assignments, rejoin when expelled
  listener   LISTEN for new messages and assignment changes (a hint; polling backs it up)
  reader     adopt partitions, read the log and the parked queue (reader.py)
  dispatcher hand due heads of idle keys to the writer to be started (up to `concurrency`)
  writer     mark or claim what starts, write results and parks, save positions, all in
             fenced rounds (writer.py); cleared messages go to the workers
  progress   write handlers' progress reports (throttled, fenced)
  releaser   release revoked partitions once drained (or at their deadline)
  watchdog   self-fence when the lease runs out

SIGTERM/SIGINT: stop reading, let in-flight handlers finish up to the drain deadline,
write their results, release every partition with its position, leave the group, exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Any

import anyio
from anyio.abc import TaskGroup
from psycopg import sql

from pgcg.consumer import handlers, observer, payloads, rebalance
from pgcg.consumer.assignment import Assignment, Owned
from pgcg.consumer.context import Context
from pgcg.consumer.handlers import Handler, RetryPolicy
from pgcg.consumer.member import Membership
from pgcg.consumer.outcomes import Backoff, ExceptionTypes
from pgcg.consumer.progress import Progress
from pgcg.consumer.reader import Reader
from pgcg.consumer.scheduler import KeyScheduler
from pgcg.consumer.transactional import Transactional
from pgcg.consumer.workers import Workers
from pgcg.consumer.writer import Writer
from pgcg.shared import names, pooler
from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.errors import DatabaseUnavailable
from pgcg.shared.loops import reconnecting
from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings

log = logging.getLogger("pgcg.consumer")
Q = Queries("consumer")


class Consumer:
    def __init__(
        self,
        settings: Settings,
        *,
        group: str,
        topic: str,
        handler: Handler,
        dsn: str | None = None,
        max_attempts: int | None = None,
        retry_on: ExceptionTypes = (Exception,),
        dead_letter_on: ExceptionTypes = (),
        backoff: Backoff | None = None,
        payload_type: Any = None,
        on_assigned: rebalance.PartitionsCallback | None = None,
        on_revoked: rebalance.PartitionsCallback | None = None,
        on_lost: rebalance.PartitionsCallback | None = None,
    ) -> None:
        """`max_attempts` (default: the setting), `retry_on`, `dead_letter_on` and
        `backoff` decide what becomes of a failed delivery (outcomes.py); `payload_type`
        (default: what the handler's first parameter declares, `Message[Order]`) is what
        each payload is validated into before the handler sees it. `on_assigned`,
        `on_revoked` (drained, before the release) and `on_lost` are the application's
        rebalance callbacks (rebalance.py)."""
        dsn = dsn or settings.dsn()
        membership = Membership(
            dsn,
            group,
            topic,
            session_timeout=settings.session_timeout,
            lease_margin=settings.lease_margin,
        )
        scheduler = KeyScheduler()
        self.ctx = Context(
            settings=settings,
            dsn=dsn,
            membership=membership,
            scheduler=scheduler,
            # A callable: the member id in log fields changes when the member rejoins.
            assignment=Assignment(scheduler, lambda: membership.fields, settings.lease_margin),
            retry=RetryPolicy(
                settings.max_attempts if max_attempts is None else max_attempts,
                settings.retry_base,
                settings.retry_max,
                retry_on=retry_on,
                dead_letter_on=dead_letter_on,
                backoff=backoff,
            ),
        )
        self.rebalance = rebalance.Events(
            rebalance.Callbacks(on_assigned, on_revoked, on_lost), lambda: self.ctx.fields
        )
        if self.rebalance.callbacks:
            self.ctx.assignment.notify = self.rebalance.add
        # A `process <topic>` span and duration per call (observer.py); same signature.
        self.handler = observer.instrument(handler, self.ctx)
        self.workers: Workers
        self.writer = Writer(
            self.ctx, started=lambda items, answered: self.workers.submit(items, answered)
        )
        self.reader = Reader(self.ctx, self.writer)
        self.progress = Progress(self.ctx, self.writer)
        # handle(message, tx): the handler's writes and its completion commit together.
        self.transactional = (
            Transactional(self.ctx, self.handler, self.writer)
            if handlers.wants_transaction(handler)
            else None
        )
        self.workers = Workers(
            self.ctx,
            handlers.caller(self.handler),
            self.writer.submit,
            self.progress,
            self.transactional,
            payload_type if payload_type is not None else payloads.handler_payload_type(handler),
            threaded=not handlers.is_async(handler),
        )
        self.joined = anyio.Event()
        self.stopped = False
        # Set by an App that LISTENs once for all its consumers (app.py): wake-ups come
        # from there instead of a listener connection of this consumer's own.
        self.external_listener = False
        self._tg: TaskGroup | None = None  # the loops' group, while run() runs them
        self._draining = False

    @property
    def member_id(self) -> str:
        return self.ctx.member_id

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        ctx = self.ctx
        if ctx.stopping:  # stopped before it started: nothing to join, drain or leave
            self.stopped = True
            return
        await self._route()
        await ctx.membership.join()
        self.joined.set()
        try:
            async with anyio.create_task_group() as outer:
                if install_signal_handlers:
                    outer.start_soon(self._signals, outer)
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    self.workers._tg = tg
                    tg.start_soon(self._heartbeat_loop)
                    if (
                        ctx.settings.listen
                        and ctx.session_dsn is not None
                        and not self.external_listener
                    ):
                        tg.start_soon(self._listener_loop)
                    tg.start_soon(self.reader.run)
                    tg.start_soon(self._dispatch_loop)
                    tg.start_soon(self.writer.run)
                    tg.start_soon(self.progress.run)
                    tg.start_soon(self.progress.watch)
                    tg.start_soon(self._release_loop)
                    tg.start_soon(self._watchdog_loop)
                    if self.rebalance.callbacks:
                        tg.start_soon(self.rebalance.run)
                    if ctx.stopping:  # stop() came while joining
                        self._begin_drain()
                outer.cancel_scope.cancel()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _route(self) -> None:
        """Decide where connections go (pooler.py) before the first one is made."""
        ctx = self.ctx
        route = await pooler.route(ctx.settings, ctx.dsn)
        ctx.through_pooler = ctx.membership.through_pooler = route.pooled
        ctx.session_dsn = route.session_dsn
        if not ctx.settings.listen:
            log.info(
                "LISTEN is off (PGCG_LISTEN=false): polling for new messages and assignments",
                extra={"action": "listen_off", **ctx.fields},
            )
        elif route.session_dsn is None:
            log.warning(
                "PGCG_DATABASE_URL goes through a transaction pooler and "
                "PGCG_SESSION_DATABASE_URL is not set: cannot LISTEN, so new messages wait "
                "up to %gs (PGCG_POLL_INTERVAL) and assignment changes up to a heartbeat",
                ctx.settings.poll_interval,
                extra={"action": "listen_unavailable", **ctx.fields},
            )

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does). Safe at any time and more than once:
        before run() it makes run() return at once; while joining, the drain begins as
        soon as the loops are up; after run() returned it does nothing."""
        self.ctx.stopping = True
        if self._tg is not None:
            self._begin_drain()

    def _begin_drain(self) -> None:
        if self._draining or self._tg is None:
            return
        self._draining = True
        self._tg.start_soon(self._drain_and_leave)

    async def _signals(self, outer: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                log.info(
                    "received %s: draining",
                    signal.Signals(signum).name,
                    extra={"action": "shutdown_requested", **self.ctx.fields},
                )
                self.stop()

    async def _drain_and_leave(self) -> None:
        ctx = self.ctx
        settings = ctx.settings
        started = time.monotonic()
        # Buffered but unstarted messages are simply released with their partitions.
        for partition in list(ctx.assignment.owned):
            ctx.scheduler.drop_partition(partition, keep_busy=True)
        with anyio.move_on_after(settings.drain_deadline):
            while ctx.scheduler.busy() > 0:
                await ctx.wake.release.wait(0.5)
        in_flight = ctx.scheduler.busy()
        if in_flight:
            log.warning(
                "drain deadline reached with %s messages in flight: cancelling them",
                in_flight,
                extra={"action": "drain_deadline", **ctx.fields},
            )
            for owned in list(ctx.assignment.owned.values()):
                owned.cancel_handlers()
                if owned.threads:
                    ctx.assignment.on_stuck(owned, "the drain deadline of a shutdown")
            # Released once the cancelled handlers have really returned.
            with anyio.move_on_after(ctx.settings.lease_margin):
                while any(o.scopes for o in ctx.assignment.owned.values()):
                    await ctx.wake.release.wait(0.05)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                await self.writer.flush()
                # Partitions handed to us while we drained are released too.
                rows = await ctx.membership.heartbeat()
                if rows is not None:
                    ctx.assignment.apply(rows, now=ctx.membership.answered_sent_at)
                await self._release(list(ctx.assignment.owned.values()), reason="shutdown")
                await ctx.membership.leave()
            except DatabaseUnavailable as exc:
                log.error(
                    "could not leave the group cleanly (%s); the coordinator will expire "
                    "this member after its session timeout",
                    exc,
                    extra={"action": "leave_failed", **ctx.fields},
                )
        log.info(
            "stopped after draining for %.2fs",
            time.monotonic() - started,
            extra={"action": "consumer_stopped", **ctx.fields},
        )
        self.stopped = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _close(self) -> None:
        await self.reader.close()
        await self.writer.close()
        await self.progress.close()
        if self.transactional is not None:
            await self.transactional.close()
        await self.ctx.membership.close()

    # -- membership --------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        ctx = self.ctx
        # Heartbeats go on while draining: the lease must outlive the in-flight handlers.
        while True:
            try:
                rows = await ctx.membership.heartbeat()
            except DatabaseUnavailable as exc:
                log.warning(
                    "heartbeat failed: %s (lease left %.1fs)",
                    exc,
                    ctx.membership.lease.remaining(),
                    extra={"action": "heartbeat_failed", **ctx.fields},
                )
                await ctx.wake.heartbeat.wait(min(1.0, ctx.settings.heartbeat_interval))
                continue
            if rows is None and ctx.stopping:
                ctx.assignment.lose_all("expelled while draining")
                return
            if rows is None:
                log.warning(
                    "expelled from the group (missed heartbeats): rejoining",
                    extra={"action": "member_expelled", **ctx.fields},
                )
                ctx.assignment.lose_all("expelled from the group")
                async for attempt in reconnecting(log, "rejoin", **ctx.fields):
                    with attempt:
                        await ctx.membership.join(rejoin=True)
                continue
            changes = ctx.assignment.apply(rows, now=ctx.membership.answered_sent_at)
            if changes.started or changes.resumed:
                ctx.wake.fetch.set()
            if changes.revoked:
                ctx.wake.release.set()
            await ctx.wake.heartbeat.wait(ctx.settings.heartbeat_interval)

    async def _watchdog_loop(self) -> None:
        ctx = self.ctx
        lease = ctx.membership.lease
        while True:
            remaining = lease.remaining()
            if remaining <= 0 and ctx.assignment.owned:
                log.error(
                    "lease expired %.1fs ago without a successful heartbeat: self-fencing",
                    -remaining,
                    extra={"action": "lease_expired", **ctx.fields},
                )
                ctx.assignment.lose_all("lease expired")
            await anyio.sleep(max(remaining, 0.2) if remaining > 0 else 0.2)

    async def _listener_loop(self) -> None:
        ctx = self.ctx
        dsn = ctx.session_dsn
        assert dsn is not None, "started only with a session to LISTEN on"
        topic_channel = names.topic_channel(ctx.topic)
        group_channel = names.group_channel(ctx.group)
        while True:
            conn: AsyncConn | None = None
            try:
                async for attempt in reconnecting(log, "listen", **ctx.fields):
                    with attempt:
                        conn = await connect(
                            dsn,
                            application_name="pgcg-listener",
                            session_timeout=ctx.settings.session_timeout,
                        )
                        with translated(dsn):
                            for channel in (topic_channel, group_channel):
                                await conn.execute(
                                    sql.SQL("LISTEN {}").format(sql.Identifier(channel))
                                )
                # NOTIFYs sent while we were away are lost: catch up now.
                ctx.wake.fetch.set()
                ctx.wake.heartbeat.set()
                assert conn is not None
                with translated(dsn):
                    async with contextlib.aclosing(conn.notifies()) as notifies:
                        async for note in notifies:
                            if note.channel == group_channel:
                                ctx.wake.heartbeat.set()
                            elif self._mine(note.payload):
                                ctx.wake.fetch.set()
            except DatabaseUnavailable as exc:
                log.warning(
                    "listener lost its connection: %s", exc, extra={"action": "listen_lost"}
                )
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await conn.close()

    def notified(self, channel: str, payload: str) -> None:
        """A NOTIFY on this consumer's topic or group channel (from a shared listener)."""
        if channel == names.group_channel(self.ctx.group):
            self.ctx.wake.heartbeat.set()
        elif channel == names.topic_channel(self.ctx.topic) and self._mine(payload):
            self.ctx.wake.fetch.set()

    def _mine(self, payload: str) -> bool:
        owned = self.ctx.assignment.owned
        try:
            return any(int(p) in owned for p in payload.split(","))
        except ValueError:
            return True

    # -- handling ----------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        """Hand due heads of idle keys to the writer, which marks (log) or claims (parked)
        them before the workers may start them; woken by reads, results and the earliest
        delayed head becoming due."""
        ctx = self.ctx
        while True:
            now = time.monotonic()
            free = self.workers.free
            if free > 0 and not ctx.stopping and ctx.membership.lease.valid(now):
                starting = []
                for item in ctx.scheduler.take(now, free):
                    owned = ctx.assignment.current(item.partition, item.epoch)
                    if owned is not None and owned.state == "assigned" and not item.parking:
                        starting.append(item)
                    else:
                        ctx.scheduler.unstart(item, now)
                if starting:
                    self.workers.pending += len(starting)
                    self.writer.start(starting)
            next_due = ctx.scheduler.next_due()
            timeout = None if next_due is None else next_due - time.monotonic()
            await ctx.wake.dispatch.wait(timeout)

    # -- revocation --------------------------------------------------------------------------

    async def _release_loop(self) -> None:
        ctx = self.ctx
        while True:
            now = time.monotonic()
            ready = ctx.assignment.releasable(now)
            if ready and not ctx.stopping:
                await self.writer.flush()
                # The flush can take a while (a reconnect, results that keep coming); the
                # leader may have called a revocation off meanwhile, and the partition be
                # working again. Release only what is still revoked and releasable.
                ready = [o for o in ctx.assignment.releasable(time.monotonic()) if o in ready]
                try:
                    await self._release(ready, reason="revoked", revoked_only=True)
                except DatabaseUnavailable as exc:
                    log.warning("release failed: %s", exc, extra={"action": "release_failed"})
            deadline = ctx.assignment.next_revoke_deadline()
            await ctx.wake.release.wait(
                None if deadline is None else max(deadline - time.monotonic(), 0.05)
            )

    async def _release(
        self, parts: list[Owned], *, reason: str, revoked_only: bool = False
    ) -> None:
        ctx = self.ctx
        if not parts:
            return
        # Drained (or past the drain deadline): the application's last word before the
        # next owner may start.
        await self.rebalance.revoked(
            [p.partition for p in parts if ctx.assignment.owned.get(p.partition) is p],
            ctx.settings.drain_deadline,
        )
        conn = await connect(
            ctx.dsn,
            application_name="pgcg-release",
            through_pooler=ctx.through_pooler,
            session_timeout=ctx.settings.session_timeout,
        )
        try:
            with ctx.assignment.handing_off(parts), translated(ctx.dsn):
                cur = await conn.execute(
                    Q.release,
                    ctx.params(
                        partitions=[p.partition for p in parts],
                        epochs=[p.epoch for p in parts],
                        # The next owner reads from the position; `clean`: nothing of this
                        # epoch is still running, so it charges no delivery.
                        ticks=[p.position() if p.adopted else p.saved for p in parts],
                        clean=[
                            p.clean
                            and not p.handlers_cancelled
                            and ctx.scheduler.busy(p.partition) == 0
                            for p in parts
                        ],
                        revoked_only=revoked_only,
                    ),
                )
                rows = {r["partition"]: r for r in await cur.fetchall()}
        finally:
            await conn.close()
        for part in parts:
            if part.partition not in rows and revoked_only and part.state == "assigned":
                # The leader called the revocation off while we released (found by pgcg
                # chaos): the database kept it ours, and so do we.
                log.info(
                    "partition %s: revocation called off, kept",
                    part.partition,
                    extra={"action": "revocation_called_off", **ctx.fields,
                           "partition": part.partition, "epoch": part.epoch},
                )  # fmt: skip
                continue
            if ctx.assignment.owned.get(part.partition) is part:  # not a newer incarnation
                ctx.assignment.owned.pop(part.partition)
                ctx.scheduler.drop_partition(part.partition)
            row: dict[str, Any] | None = rows.get(part.partition)
            with ctx.assignment.releasing(part, row, reason):  # ends its revoke span
                log.info(
                    "partition %s released (%s) to %s",
                    part.partition,
                    reason,
                    (row or {}).get("new_owner") or "nobody",
                    extra={"action": "partition_released", **ctx.fields,
                           "partition": part.partition, "epoch": part.epoch,
                           "new_epoch": (row or {}).get("epoch"), "reason": reason,
                           "to_member": (row or {}).get("new_owner"), "fenced": row is None},
                )  # fmt: skip
