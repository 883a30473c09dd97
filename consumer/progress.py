"""Progress of running handlers, and the deadline that tells a slow handler from a stuck one.

Every delivery runs under a deadline of PGCG_VISIBILITY_TIMEOUT seconds; each progress
report (`await message.progress(percent, text)`) moves it to that many seconds after the
report. A handler that stops reporting past its deadline is stuck: it is cancelled and
its message retried. One watchdog loop cancels the handlers past their deadline, rather
than a timer per delivery: arming and disarming a deadline timer cost a no-op consumer
about a tenth of its CPU. A deadline is kept to within a quarter of the visibility timeout
(at most WATCH_INTERVAL seconds late).

Reports only touch memory on the handler's path. A background loop writes the latest
report of each delivery to its message row, at most once a second per message and a batch
per statement, fenced by the partition's epoch like an ack; the write also moves the row's
`locked_until`. So other connections (`pgcg status`, `in_flight_progress`) see how far each
handler got, a slow database never makes a handler look stuck, and a report that finds the
partition gone drops it (which cancels its handlers) like a rejected ack.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
from opentelemetry import metrics

from pgcg.consumer.context import Context
from pgcg.consumer.message import Item, Message
from pgcg.consumer.writer import Writer
from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.errors import DatabaseUnavailable, InvalidInput
from pgcg.shared.loops import Signal
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.consumer.progress")
Q = Queries("consumer")
STATUS = Queries("status")

# At most one database write per message per this many seconds; later reports in the
# window are folded into the next write.
MIN_WRITE_INTERVAL = 1.0
MAX_TEXT = 500
WATCH_INTERVAL = 1.0  # the watchdog's longest sleep between looks at the deadlines

_meter = metrics.get_meter("pgcg.consumer")
_reports = _meter.create_counter(
    "pgcg.consumer.progress.reports",
    unit="{report}",
    description="Progress reports made by handlers (each one extends the handler's deadline).",
)
_writes = _meter.create_counter(
    "pgcg.consumer.progress.writes",
    unit="{row}",
    description="Progress reports written to message rows (throttled per message).",
)
_stuck = _meter.create_counter(
    "pgcg.consumer.handlers.stuck",
    unit="{delivery}",
    description="Handlers cancelled for not finishing or reporting progress in time.",
)


@dataclass(eq=False)
class Delivery:
    """One message in a handler: its deadline and its latest progress report."""

    item: Item
    # The scope the handler runs in (its worker's, which outlives the delivery: a scope
    # per delivery cost a no-op consumer more CPU than its handler); the watchdog cancels
    # it, having marked the delivery stuck, so the worker can tell that from a lost
    # partition, which cancels the same scope.
    scope: anyio.CancelScope
    due: float  # time.monotonic() past which the handler is stuck; a report moves it
    message: Message = field(init=False)
    percent: float | None = None
    text: str = ""
    reports: int = 0
    dirty: bool = False  # a report not yet written
    stuck: bool = False  # cancelled by the watchdog past `due`
    written_at: float = -math.inf  # monotonic


class Progress:
    """Deadlines of running handlers, and the loop that writes their progress reports."""

    def __init__(self, ctx: Context, writer: Writer) -> None:
        self.ctx = ctx
        self.writer = writer
        self._live: dict[int, Delivery] = {}
        self._wake = Signal()
        self._started = Signal()  # a delivery began: the watchdog has deadlines to watch
        self._conn: AsyncConn | None = None

    @property
    def visibility(self) -> float:
        return self.ctx.settings.visibility_timeout

    # -- the handler's side ---------------------------------------------------------------

    def start(self, item: Item, scope: anyio.CancelScope) -> Delivery:
        """A handler is about to run on `item` in `scope`: its deadline, and the message it
        gets."""
        delivery = Delivery(item, scope, time.monotonic() + self.visibility)
        # Weakly: the message holds this function, so a strong reference would make message,
        # delivery and function a cycle for every message, left to the garbage collector
        # (with the item in it: a sixth of a no-op consumer's CPU went to collecting them).
        ref = weakref.ref(delivery)

        async def report(percent: float, text: str = "") -> None:
            await self.report(ref(), percent, text)

        # The item's message is this delivery's alone (a retry is a new delivery with a new
        # reporter), so set the reporter in place: a copy per message costs more than all
        # the rest of starting it.
        object.__setattr__(item.message, "reporter", report)
        delivery.message = item.message
        self._live[item.id] = delivery
        self._started.set()
        return delivery

    def end(self, delivery: Delivery) -> None:
        """The handler is done (whatever the outcome): nothing more to write for it."""
        # Only this delivery: should another of the same message ever be live, its reports
        # must keep counting.
        if self._live.get(delivery.item.id) is delivery:
            del self._live[delivery.item.id]

    async def report(self, delivery: Delivery | None, percent: float, text: str = "") -> None:
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise InvalidInput(f"progress percent must be a number from 0 to 100, not {percent!r}")
        if not 0 <= percent <= 100:
            raise InvalidInput(f"progress percent must be from 0 to 100, not {percent}")
        if not isinstance(text, str) or "\x00" in text:
            raise InvalidInput("progress text must be a string without NUL characters")
        if delivery is None or self._live.get(delivery.item.id) is not delivery:
            # The handler has returned (a task it left behind reports late): its result
            # is written or on its way, and there is no deadline left to move.
            await anyio.lowlevel.checkpoint()
            return
        delivery.due = time.monotonic() + self.visibility
        delivery.percent = float(percent)
        delivery.text = text[:MAX_TEXT]
        delivery.reports += 1
        _reports.add(1, {"group": self.ctx.group, "topic": self.ctx.topic})
        item = delivery.item
        if not item.parked and not item.parking:
            # A long delivery: park it (it goes on running), so it does not hold the
            # partition's position, and its progress has a row to go to.
            self.writer.park_key(item.key, "long")
        if not delivery.dirty:
            delivery.dirty = True
            self._wake.set()  # the writer works out when this one is due
        await anyio.lowlevel.checkpoint()

    def stuck(self, delivery: Delivery) -> str:
        """The handler's deadline passed: log it and say why the message is retried."""
        item = delivery.item
        _stuck.add(1, {"group": self.ctx.group, "topic": self.ctx.topic})
        last = (
            f"; last progress {delivery.percent:g}% ({delivery.text})" if delivery.reports else ""
        )
        log.warning(
            "message %s: handler stuck, no result or progress report within %ss: "
            "cancelled, will retry%s",
            item.id, self.visibility, last,
            extra={"action": "handler_stuck", **self.ctx.fields, "partition": item.partition,
                   "epoch": item.epoch, "message_id": item.id, "attempt": item.message.attempt,
                   "reports": delivery.reports},
        )  # fmt: skip
        return (
            f"handler stuck: no result or progress report within {self.visibility}s "
            f"(PGCG_VISIBILITY_TIMEOUT){last}"
        )

    # -- the watchdog -----------------------------------------------------------------------

    async def watch(self) -> None:
        """Cancel the handlers past their deadline (stuck() then says why)."""
        while True:
            if not self._live:
                # Nothing running, no deadline to pass: an idle consumer is not woken
                # every second for nothing. A deadline is a visibility timeout after
                # its start, so looking a watch interval after that is in time.
                await self._started.wait()
            await anyio.sleep(min(WATCH_INTERVAL, self.visibility / 4))
            now = time.monotonic()
            for delivery in list(self._live.values()):
                if delivery.due <= now and not delivery.stuck:
                    # Still live: its handler has not returned (a delivery leaves _live
                    # before its worker moves on), so the cancellation reaches it.
                    delivery.stuck = True
                    delivery.scope.cancel()

    # -- the writer loop --------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            due = [
                d
                for d in self._live.values()
                if d.dirty and now - d.written_at >= MIN_WRITE_INTERVAL and d.item.parked
            ]
            if due:
                await self.write(due)
            waiting = [d.written_at for d in self._live.values() if d.dirty and d.item.parked]
            if any(d.dirty and not d.item.parked for d in self._live.values()):
                waiting.append(now - MIN_WRITE_INTERVAL + 0.1)  # its park is on the way
            timeout = None
            if waiting:
                timeout = max(min(waiting) + MIN_WRITE_INTERVAL - time.monotonic(), 0.01)
            await self._wake.wait(timeout)

    async def write(self, due: list[Delivery]) -> None:
        """Write the latest report of each delivery; drop partitions the fence says we lost."""
        ctx = self.ctx
        now = time.monotonic()
        for d in due:
            d.dirty = False
            d.written_at = now
        items = [d.item for d in due]
        try:
            conn = await self._connection()
            with translated(ctx.dsn):
                cur = await conn.execute(
                    Q.report_progress,
                    ctx.params(
                        partitions=[i.partition for i in items],
                        epochs=[i.epoch for i in items],
                        ids=[i.parked_id for i in items],
                        percents=[d.percent for d in due],
                        texts=[d.text for d in due],
                        visibility_ms=round(self.visibility * 1000),
                    ),
                )
                rows = await cur.fetchall()
        except DatabaseUnavailable as exc:
            self._conn = None
            for d in due:
                d.dirty = True  # try again after the interval
            log.warning(
                "could not write progress: %s",
                exc,
                extra={"action": "progress_failed", **ctx.fields},
            )
            return
        _writes.add(len(due), {"group": ctx.group, "topic": ctx.topic})
        still_ours = {(r["partition"], r["epoch"]) for r in rows}
        for partition, epoch in {(i.partition, i.epoch) for i in items} - still_ours:
            log.warning(
                "progress rejected for partition %s at epoch %s: it belongs to a newer epoch now",
                partition, epoch,
                extra={"action": "progress_rejected", **ctx.fields, "partition": partition,
                       "epoch": epoch},
            )  # fmt: skip
            if ctx.assignment.current(partition, epoch) is not None:
                ctx.assignment.lose(partition, "progress report rejected by the epoch fence")
            ctx.wake.heartbeat.set()

    async def _connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.ctx.dsn,
                application_name="pgcg-progress",
                through_pooler=self.ctx.through_pooler,
                session_timeout=self.ctx.settings.session_timeout,
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


def in_flight_progress(
    conn: psycopg.Connection[Any], group: str, *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Handlers of `group` running now that reported progress, for `pgcg status`.

    One dict per message: partition, message_id, key, member_id, epoch, attempt, percent,
    text, reported_at, locked_until, overdue (past its deadline: about to be cancelled).
    """
    with translated(), conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(STATUS.in_flight_progress, {"group": group, "now": now})
        return cur.fetchall()
