"""One consumer member: wires membership, reader, scheduler, writer and handlers together,
and owns shutdown.

Loops (all in one task group, all cancellable):
  heartbeat  renew the lease and read assignments (heartbeat.py: an App's members share
             one; a consumer alone runs its own, with itself as its one member)
  rejoin     rejoin when the heartbeat found the member expelled
  listener   LISTEN for new messages and assignment changes (a hint; polling backs it up;
             listener.py: an App's members share one)
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

import logging
import signal
import time
from typing import Any

import anyio
from anyio.abc import TaskGroup

from pgcg.consumer import handlers, observer, payloads, rebalance
from pgcg.consumer.assignment import Assignment, Owned
from pgcg.consumer.context import Context
from pgcg.consumer.handlers import Handler, RetryPolicy
from pgcg.consumer.heartbeat import Answer, Heartbeat, HeartbeatFailure
from pgcg.consumer.listener import Listener
from pgcg.consumer.member import Membership
from pgcg.consumer.outcomes import Backoff, ExceptionTypes
from pgcg.consumer.progress import Progress
from pgcg.consumer.reader import Reader
from pgcg.consumer.scheduler import KeyScheduler
from pgcg.consumer.transactional import Transactional
from pgcg.consumer.workers import Workers
from pgcg.consumer.writer import Writer
from pgcg.shared import names, pooler, taskdump
from pgcg.shared.db import connect, translated
from pgcg.shared.errors import DatabaseUnavailable
from pgcg.shared.loops import Signal, reconnecting
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
        # Its own heartbeat, with itself as the one member, unless an App gives it the
        # process's (share_heartbeat) before it runs.
        self.heartbeat = Heartbeat(
            dsn,
            session_timeout=settings.session_timeout,
            interval=settings.heartbeat_interval,
            application_name=Heartbeat.name_for([names.group_name(group)]),
        )
        self._owns_heartbeat = True
        membership = Membership(
            dsn,
            group,
            topic,
            session_timeout=settings.session_timeout,
            lease_margin=settings.lease_margin,
            heartbeat=self.heartbeat,
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
        # Whoever wants the assignments read now wakes the heartbeat (of every member).
        self.ctx.wake.heartbeat = self.heartbeat.wake
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
        # Set by an App that LISTENs once for all its consumers (app.py, listen_on): wake-ups
        # come from there instead of a listener connection of this consumer's own.
        self.external_listener = False
        self._tg: TaskGroup | None = None  # the loops' group, while run() runs them
        self._draining = False
        self._rejoin = Signal()  # the heartbeat found us expelled

    def share_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Heartbeat through `heartbeat` (an App's, run by the App) instead of our own.
        Before run()."""
        self.heartbeat = heartbeat
        self._owns_heartbeat = False
        self.ctx.membership.share(heartbeat)
        self.ctx.wake.heartbeat = heartbeat.wake

    def listen_on(self, listener: Listener) -> None:
        """Hear of new messages on our partitions and of assignment changes from
        `listener` (ours, or an App's shared by its consumers)."""
        ctx = self.ctx

        def new_messages(payload: str) -> None:
            if self._mine(payload):
                ctx.wake.fetch.set()

        def catch_up() -> None:
            ctx.wake.fetch.set()
            ctx.wake.heartbeat.set()

        listener.subscribe(names.topic_channel(ctx.topic), new_messages)
        listener.subscribe(names.group_channel(ctx.group), lambda _: ctx.wake.heartbeat.set())
        listener.on_reconnect(catch_up)
        ctx.listening = lambda: listener.listening
        # Lost: the reader goes back to polling at once, not after its safety poll.
        listener.on_change(ctx.wake.fetch.set)

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
        self.heartbeat.attach(ctx.membership, self._heard, self._heartbeat_failed)
        self.joined.set()
        try:
            async with anyio.create_task_group() as outer:
                if install_signal_handlers:
                    outer.start_soon(self._signals, outer)
                    taskdump.install()
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    self.workers._tg = tg
                    if self._owns_heartbeat:
                        tg.start_soon(self.heartbeat.run)
                    tg.start_soon(self._rejoin_loop)
                    if (
                        ctx.settings.listen
                        and ctx.session_dsn is not None
                        and not self.external_listener
                    ):
                        listener = Listener(
                            ctx.session_dsn, session_timeout=ctx.settings.session_timeout
                        )
                        self.listen_on(listener)
                        tg.start_soon(listener.run)
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
        if self._owns_heartbeat:
            self.heartbeat.through_pooler = route.pooled
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
            for owned in list(ctx.assignment.owned.values()):
                if owned.scopes:  # async handlers that ignore cancellation
                    ctx.assignment.on_stuck(owned, "the drain deadline of a shutdown")
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

    def _heard(self, rows: Answer) -> None:
        """A heartbeat answered (heartbeat.py): our lease was renewed from when it was sent,
        and these are our assignments as of then; None: we were expelled. Called by the
        heartbeat's loop, synchronously: the assignments are applied before anything else
        runs on the lease they renewed."""
        ctx = self.ctx
        if rows is None:
            ctx.membership.in_group = False
            if ctx.stopping:
                ctx.assignment.lose_all("expelled while draining")
                return
            log.warning(
                "expelled from the group (missed heartbeats): rejoining",
                extra={"action": "member_expelled", **ctx.fields},
            )
            ctx.assignment.lose_all("expelled from the group")
            self._rejoin.set()
            return
        changes = ctx.assignment.apply(rows, now=ctx.membership.answered_sent_at)
        if changes.started or changes.resumed:
            ctx.wake.fetch.set()
        if changes.revoked:
            ctx.wake.release.set()

    def _heartbeat_failed(self, exc: HeartbeatFailure) -> None:
        # Nothing renewed: the watchdog self-fences when the lease runs out.
        log.warning(
            "heartbeat failed: %s (lease left %.1fs)",
            exc,
            self.ctx.membership.lease.remaining(),
            extra={"action": "heartbeat_failed", **self.ctx.fields},
        )

    async def _rejoin_loop(self) -> None:
        ctx = self.ctx
        while True:
            await self._rejoin.wait()
            async for attempt in reconnecting(log, "rejoin", **ctx.fields):
                with attempt:
                    await ctx.membership.join(rejoin=True)
            self.heartbeat.wake.set()  # our assignments, at once

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
